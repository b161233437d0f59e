"""Exact resume, kill safety, SIGTERM, non-finite losses, accumulation equivalence, unwritable outputs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_f32_grad_close, read_metrics, train_argv
from safetensors.torch import load_file
from transformers import TrainerCallback

from prefopt.config import TrainConfig
from prefopt.errors import PrefoptError
from prefopt.losses import LossOutput, available_losses, get_loss_spec, register_loss
from prefopt.training.run import train

from .test_losses_end_to_end import SAMPLES, run


class GradientsBeforeStep(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def losses_by_step(output_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(output_dir) if "loss" in m}


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_logs_the_same_losses_as_the_uninterrupted_run(tmp_path, tiny_model_dir):
    settings = dict(max_steps=6, save_steps=3, batch_size=2, num_epochs=1)
    straight = run(tmp_path / "straight", tiny_model_dir, **settings)
    config = dict(
        model=tiny_model_dir,
        data=[str(SAMPLES / "standard.jsonl")],
        output_dir=str(tmp_path / "stopped"),
        logging_steps=1,
        learning_rate=1e-3,
        max_length=96,
        **settings,
    )
    train(TrainConfig(**config), callbacks=[StopAfter(3)], save_final=False)
    assert (tmp_path / "stopped" / "checkpoint-3").is_dir()
    resumed = train(TrainConfig(**config, resume=True))
    assert resumed.steps == 6
    assert losses_by_step(resumed.output_dir) == losses_by_step(straight.output_dir)  # bit-identical on the CPU
    a, b = load_file(straight.final_dir / "model.safetensors"), load_file(resumed.final_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cli(tmp_path, model_dir, out, *extra):
    return [
        sys.executable,
        "-m",
        "prefopt",
        *train_argv(
            model_dir,
            out,
            "standard.jsonl",
            "--max-steps",
            "40",
            "--save-steps",
            "2",
            "--batch-size",
            "2",
            "--logging-steps",
            "1",
            "--max-length",
            "96",
            "--learning-rate",
            "1e-3",
            *extra,
        ),
    ]


def _wait_for(path: Path, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_then_resume_to_the_end(tmp_path, tiny_model_dir):
    out = tmp_path / "killed"
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        _cli(tmp_path, tiny_model_dir, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for(out / "checkpoint-4")
    proc.send_signal(signal.SIGKILL)  # at an arbitrary moment: training, or in the middle of a save
    proc.wait()
    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    for name in checkpoints:  # whatever was renamed into place is complete
        assert (out / name / "trainer_state.json").exists(), name
    result = subprocess.run(_cli(tmp_path, tiny_model_dir, out, "--resume"), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prefopt: done: 40 steps" in result.stdout
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == list(range(1, 41))  # every step logged once, none twice


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_model_dir):
    out = tmp_path / "term"
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        # far more steps than can finish before the signal arrives (40 tiny steps can take under a second)
        _cli(tmp_path, tiny_model_dir, out, "--save-steps", "100000", "--max-steps", "100000"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    _wait_for(out / "metrics.jsonl")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "SIGTERM received: stopped at step" in stdout and "--resume" in stdout
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())


class _SignalAtTrainEnd(TrainerCallback):
    """Sends SIGTERM to this process after the last step, before prefopt evaluates and saves final/."""

    def on_train_end(self, args, state, control, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_after_the_last_step_still_saves_final(tmp_path, tiny_model_dir, capsys):
    before = signal.getsignal(signal.SIGTERM)
    result = run(tmp_path, tiny_model_dir, callbacks=[_SignalAtTrainEnd()])
    assert result.steps == 3 and not result.interrupted
    assert (result.final_dir / "model.safetensors").exists() and (result.output_dir / "summary.json").exists()
    assert "SIGTERM received after the last step" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_nonfinite_loss_stops_with_step_and_examples(tmp_path, tiny_model_dir):
    calls = {"n": 0}

    @register_loss("test_nan_on_third_call", needs_reference=False, replace=True)
    def nan_loss(inputs, *, beta: float = 0.1) -> LossOutput:
        """DPO-free toy loss that returns NaN on its third call."""
        calls["n"] += 1
        loss = -inputs.policy_chosen_logps.mean() * beta
        return LossOutput(loss * float("nan") if calls["n"] == 3 else loss)

    with pytest.raises(
        PrefoptError,
        match=r"non-finite loss at step 3 \(examples .*standard.jsonl:\d+.*last good checkpoint: checkpoint-2",
    ):
        run(tmp_path / "a", tiny_model_dir, loss="test_nan_on_third_call", max_steps=5, save_steps=2)
    calls["n"] = 0
    result = run(tmp_path / "b", tiny_model_dir, loss="test_nan_on_third_call", max_steps=5, skip_nonfinite=1)
    assert result.steps == 5 and len(result.trainer.skipped_batches) == 1
    assert result.trainer.skipped_batches[0].startswith("step 3: loss")


def test_nonfinite_gradient_stops_with_step_and_examples(tmp_path, tiny_model_dir):
    """A finite loss with a NaN gradient: sqrt(0 * logp) is 0 forward, but d/dx = 0.5 / sqrt(0) * 0 = inf * 0 = NaN."""
    calls = {"n": 0}

    @register_loss("test_nan_gradient_on_third_call", needs_reference=False, replace=True)
    def nan_gradient_loss(inputs, *, beta: float = 0.1) -> LossOutput:
        calls["n"] += 1
        loss = -inputs.policy_chosen_logps.mean() * beta
        if calls["n"] == 3:
            loss = loss + (inputs.policy_chosen_logps * 0).sum().sqrt()
        return LossOutput(loss)

    with pytest.raises(PrefoptError, match=r"non-finite gradient at step 3 \(examples .*standard.jsonl:\d+"):
        run(tmp_path / "a", tiny_model_dir, loss="test_nan_gradient_on_third_call", max_steps=5, save_steps=2)
    calls["n"] = 0
    result = run(tmp_path / "b", tiny_model_dir, loss="test_nan_gradient_on_third_call", max_steps=5, skip_nonfinite=1)
    assert result.steps == 5 and result.trainer.skipped_batches[0].startswith("step 3: gradient")
    assert all(torch.isfinite(t).all() for t in load_file(result.final_dir / "model.safetensors").values())


PAIRWISE = [n for n in available_losses() if get_loss_spec(n).paired and not n.startswith("test_")]


@pytest.mark.parametrize("name", PAIRWISE)
def test_batch_8_equals_batch_2_times_accumulation_4(name, tmp_path, tiny_model_dir):
    # bco_pair's default delta is the batch's mean reward, a per-micro-batch statistic like KTO's z: fix it
    loss_args = {"delta": 0.0} if name == "bco_pair" else {}
    results = {}
    for label, batch, accum in (("8x1", 8, 1), ("2x4", 2, 4)):
        gradients = GradientsBeforeStep()
        result = run(
            tmp_path / label,
            tiny_model_dir,
            callbacks=[gradients],
            loss=name,
            max_steps=1,
            batch_size=batch,
            grad_accum=accum,
            loss_args=loss_args,
        )
        results[label] = (result.metrics["loss"], gradients.grads)
    assert results["8x1"][0] == pytest.approx(results["2x4"][0], rel=1e-5, abs=1e-6)
    # The accumulated gradient, not the weights after the step: Adam's first step is lr*g/(|g|+1e-8),
    # which turns float32 rounding of entries near 1e-8 into differences up to 3e-5 (and hides a
    # gradient off by a constant factor).
    a, b = results["8x1"][1], results["2x4"][1]
    assert a and set(a) == set(b)
    for key in a:
        assert_f32_grad_close(b[key], a[key], key)


def test_kto_reference_point_is_per_micro_batch(tmp_path, tiny_model_dir):
    """Documented behaviour: z is the mean over the micro-batch's mismatched pairs (no all-reduce),
    so KTO with accumulation is close to, but not exactly, the large-batch run."""
    data = [str(SAMPLES / "unpaired.jsonl")]
    big = run(tmp_path / "big", tiny_model_dir, loss="kto", data=data, max_steps=1, batch_size=8)
    small = run(tmp_path / "small", tiny_model_dir, loss="kto", data=data, max_steps=1, batch_size=2, grad_accum=4)
    assert big.metrics["loss"] == pytest.approx(0.5, abs=1e-5) and small.metrics["loss"] == pytest.approx(0.5, abs=1e-5)


def test_unwritable_output_dir_is_detected_before_training(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PrefoptError, match="is not writable"):
        run(tmp_path, tiny_model_dir, output_dir=str(blocker / "out"))


def test_checkpoints_hold_weights_as_safetensors(tmp_path, tiny_model_dir):
    result = run(tmp_path, tiny_model_dir, max_steps=2, save_steps=2)
    checkpoint = result.output_dir / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists() and not (checkpoint / "pytorch_model.bin").exists()
    assert not (result.output_dir / ".staging").exists()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_a_crash_in_the_middle_of_a_save_leaves_no_half_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    """Deterministic twin of the SIGKILL test: the save of checkpoint-4 dies after the weights are written."""
    from transformers import Trainer

    original = Trainer._save_optimizer_and_scheduler

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("simulated kill during the save")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_model_dir, max_steps=6, save_steps=2)
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert (out / ".staging" / "checkpoint-4" / "model.safetensors").exists()  # the half-written one
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)
    resumed = run(tmp_path, tiny_model_dir, max_steps=6, save_steps=2, resume=True)
    assert resumed.steps == 6
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4, 5, 6]
