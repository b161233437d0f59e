"""`make bench`'s DPO table (prefopt.bench.dpo): the FLOP count by hand, and a --quick run on a tiny model."""

import os
import subprocess
import sys

import pytest
from helpers import tiny_llama

from prefopt.bench.flops import ModelShape


def test_step_flops_by_hand():
    """N = 100 matmul weights, 2 layers, attention width 8, sequences of 3 and 5 tokens:
    matmuls 2 N tokens = 2 * 100 * 8 = 1600; attention 2 L d S^2 = 2 * 2 * 8 * (9 + 25) = 1088;
    with a reference: (3 + 1) passes * 2688 = 10752; without: 3 * 2688 = 8064."""
    shape = ModelShape(matmul_weights=100, layers=2, attention_width=8)
    assert shape.step_flops([3, 5]) == 10752
    assert shape.step_flops([3, 5], reference=False) == 8064


def test_model_shape_counts_the_matmul_weights(tiny_model_dir):
    """The tiny Llama: per layer q, o 64x64, k, v 32x64 (2 of 4 heads), gate, up 128x64, down 64x128;
    plus the untied 259x64 head; the embedding lookup is not a matmul."""
    shape = ModelShape.of(tiny_model_dir)
    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64
    assert shape == ModelShape(2 * per_layer + 259 * 64, 2, 64)
    linears = sum(m.weight.numel() for m in tiny_llama().modules() if type(m).__name__ == "Linear")
    assert shape.matmul_weights == linears


def _native_bf16_units() -> bool:
    from prefopt.models.precision import UNITS_ENV, bf16_units

    saved = os.environ.pop(UNITS_ENV, None)
    try:
        return bf16_units() is not None
    finally:
        if saved is not None:
            os.environ[UNITS_ENV] = saved


@pytest.mark.skipif(
    not _native_bf16_units(),
    reason="this CPU has no bf16 units: emulated bf16 makes the forced-bf16 rows run past the 10-minute limit",
)
def test_quick_bench_prints_the_default_and_fp32_rows_with_their_distance_to_the_peak(tmp_path, tiny_model_dir):
    out = tmp_path / "results.md"
    env = {**os.environ, "PREFOPT_BENCH_MODEL": tiny_model_dir, "PREFOPT_BF16_UNITS": "1"}
    command = [sys.executable, "-m", "prefopt.bench.dpo", "--quick", "--steps", "2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    assert "matmul peak" in table and "TFLOP/s bf16" in table
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")
    }
    for name in (
        "prefopt dpo, its default (mixed_precision auto)",
        "TRL DPOTrainer, its default (bf16 autocast)",
        "prefopt dpo, fp32",
        "TRL DPOTrainer, fp32",
    ):
        assert name in rows, (name, table)
    # bf16 units forced on: prefopt's default computes in bf16 and is measured against the bf16 peak
    assert rows["prefopt dpo, its default (mixed_precision auto)"][-1].startswith(tuple("0123456789"))
    assert "of bf16" in rows["prefopt dpo, its default (mixed_precision auto)"][-1]
    assert "of fp32" in rows["prefopt dpo, fp32"][-1]
    assert rows["TRL DPOTrainer, fp32"][5] == "1.00x"
    assert "default vs TRL's default:" in table and "fp32 vs TRL fp32:" in table
