"""Programs, not library: benchmarks (`dpo`, `sample`, `grpo`, `online`), the demo and the
experiments. Each runs as `python -m prefopt.bench.NAME`; `python -m prefopt.bench` runs the DPO
benchmark. The library never imports this package (tests/test_architecture.py holds it)."""
