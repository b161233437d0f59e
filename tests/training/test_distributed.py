"""Two processes on the CPU (torchrun, gloo): the same code path accelerate/torchrun use for multi-GPU."""

import os
import subprocess
import sys

import pytest
from helpers import read_metrics, train_argv


@pytest.mark.parametrize("extra", [[], ["--lora", "--reference", "adapter"]], ids=["full", "lora-adapter"])
def test_two_process_data_parallel_run(tmp_path, tiny_model_dir, extra):
    out = tmp_path / "ddp"
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    argv = train_argv(
        tiny_model_dir,
        out,
        "standard.jsonl",
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--max-length",
        "96",
        "--logging-steps",
        "1",
        "--learning-rate",
        "1e-3",
        *extra,
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "prefopt", *argv]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("prefopt: done: 3 steps") == 1  # the summary comes from the main process only
    logs = [m for m in read_metrics(out) if "loss" in m]
    assert [m["step"] for m in logs] == [1, 2, 3]
    assert abs(logs[0]["loss"] - 0.6931) < 1e-3
    assert (out / "final").is_dir() and (out / "config.yaml").exists()
