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


NAN_ON_ONE_PROCESS = '''
import os

from prefopt.losses import LossOutput, get_loss, register_loss

calls = []


@register_loss("dpo_nan_on_rank1", replace=True)
def dpo_nan_on_rank1(inputs, *, beta: float = 0.1):
    """DPO, except that process 1's second training batch has a NaN loss."""
    out = get_loss("dpo")(inputs, beta=beta)
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 2:
        return LossOutput(out.loss * float("nan"), out.metrics)
    return out
'''


def test_a_batch_one_process_skips_is_skipped_by_all(tmp_path, tiny_model_dir):
    """Issue #19 item 4: the process with a NaN loss used to return a zero without a graph, so its
    DDP reducer never fired and the other process waited in the all-reduce until the timeout.
    Now both processes vote, both skip the batch, and the run finishes."""
    module = tmp_path / "nan_loss.py"
    module.write_text(NAN_ON_ONE_PROCESS)
    out = tmp_path / "ddp"
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    argv = train_argv(
        tiny_model_dir, out, "standard.jsonl", "--loss", "dpo_nan_on_rank1", "--loss-module", str(module),
        "--max-steps", "3", "--batch-size", "2", "--max-length", "96", "--logging-steps", "1",
        "--learning-rate", "1e-3", "--skip-nonfinite", "1",
    )  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "prefopt", *argv]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("skipped a batch with a non-finite loss at step 2") == 1, result.stdout[-2000:]
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3]
    assert (out / "final" / "model.safetensors").exists()
