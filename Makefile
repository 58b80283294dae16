# Two commands on a fresh machine: `make serve` (the main job) and `make test`.
# Both create .venv and install what they need. torch is pinned so pip takes the
# CPU build instead of resolving the CUDA wheel set.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install serve test lint bench-engine bench-pipeline bench-optimizer demo-model stubs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/tokenline serve

test: install
	$(VENV)/bin/ruff check services tests loadtest
	$(VENV)/bin/mypy services
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check services tests loadtest
	$(VENV)/bin/mypy services

demo-model: install
	$(VENV)/bin/tokenline demo-model

bench-engine: install
	$(VENV)/bin/tokenline bench engine --json bench-results/engine.json

bench-pipeline: install
	$(VENV)/bin/tokenline bench pipeline --json bench-results/pipeline.json

bench-optimizer: install
	$(VENV)/bin/tokenline bench optimizer --json bench-results/optimizer.json

stubs: install
	$(PY) protos/generate_stubs.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench-results
