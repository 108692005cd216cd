# The two commands: `make demo` and `make test`. Both set everything up on a machine with only Python 3.11:
# a .venv, torch (the CPU build, pinned, installed first), the project, the cached assets. Re-running is fast.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.stamp-deps
SERVER := $(VENV)/.stamp-server
DEMO_CONFIG ?= experiments/demo.yaml

.PHONY: demo test setup assets server clean-venv

demo: setup
	$(PY) -m rpp.cli demo --config $(DEMO_CONFIG)

test: setup $(SERVER)
	$(PY) -m pytest --durations=15

setup: $(DEPS) assets

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(DEPS): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The real OpenAI-compatible server for the server backend's tests (compiles llama.cpp, ~3 min, once).
# Built here rather than cached as a wheel because it compiles with -march=native.
$(SERVER): $(DEPS)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet 'llama-cpp-python[server]==0.3.36'
	touch $@

server: $(SERVER)

assets: $(DEPS)
	$(PY) -m rpp.cli assets fetch

clean-venv:
	rm -rf $(VENV)
