"""Two processes on the CPU (torchrun, gloo): the same code path accelerate/torchrun use for multi-GPU."""

import os
import subprocess
import sys

import pytest
from helpers import SAMPLES, read_metrics, train_argv

from prefopt.cli.main import main


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


def test_held_out_metrics_are_over_every_processes_shard(tmp_path, tiny_model_dir):
    """Issue #19 item 8: with two processes each evaluated its half of the held-out set and the
    logged numbers were the main process's half. The mean chosen log-prob before training (it
    differs from example to example) must be the single-process one."""
    # 48 pairs: 12 batches of 2 per process, so accelerate pads no process's shard with repeats
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join((SAMPLES / "standard.jsonl").read_text().splitlines(keepends=True)[:48]))
    common = ["--max-steps", "1", "--batch-size", "2", "--max-length", "96", "--logging-steps", "1",
              "--eval-data", str(held_out)]  # fmt: skip
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    two, one = tmp_path / "two", tmp_path / "one"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "prefopt",
               *train_argv(tiny_model_dir, two, "standard.jsonl", *common)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(train_argv(tiny_model_dir, one, "standard.jsonl", *common)) == 0
    before = lambda out: next(m for m in read_metrics(out) if "eval_before_logps/chosen" in m)  # noqa: E731
    assert before(two)["eval_before_logps/chosen"] == pytest.approx(before(one)["eval_before_logps/chosen"], rel=1e-5)


def test_an_eager_attention_model_gets_its_float_mask_under_ddp(tmp_path):
    """Issue #19 item 5: the attention implementation was read from the DDP wrapper (no `.config`),
    taken as "sdpa", and an eager model (Gemma-2's default) got the shared layout's boolean mask
    added as a bias: nothing masked for the policy, so it no longer equalled its reference at
    step 1. Now DPO starts at ln 2 there too."""
    import torch
    import transformers
    from helpers import byte_tokenizer

    torch.manual_seed(0)
    config = transformers.Gemma2Config(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=0, eos_token_id=0,
        bos_token_id=None,
    )  # fmt: skip
    model = transformers.Gemma2ForCausalLM(config)
    assert model.config._attn_implementation == "eager"
    model.save_pretrained(tmp_path / "gemma2")
    byte_tokenizer().save_pretrained(tmp_path / "gemma2")
    out = tmp_path / "ddp"
    argv = train_argv(tmp_path / "gemma2", out, "standard.jsonl", "--max-steps", "1", "--batch-size", "2",
                      "--max-length", "96", "--logging-steps", "1", "--reference", "copy")  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "prefopt", *argv]
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    first = next(m for m in read_metrics(out) if "loss" in m)
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)


def test_ddp_walks_the_graph_for_unused_weights_only_for_experts():
    """find_unused_parameters costs a graph walk per step: off for dense models, whose every trained
    weight gets a gradient each step; on for a mixture of experts (an expert may get no token)."""
    from types import SimpleNamespace

    from helpers import tiny_llama
    from transformers import Qwen3MoeConfig

    from prefopt.training.run import _may_leave_weights_unused

    assert _may_leave_weights_unused(tiny_llama(0)) is False
    assert _may_leave_weights_unused(SimpleNamespace(config=Qwen3MoeConfig(num_experts=4))) is True
    assert _may_leave_weights_unused(None) is True
