"""Defects a code review found (issue 10 item 3, issue 14 item 5), each pinned by a test."""

import pytest
from helpers import read_metrics

from prefopt.errors import PrefoptError
from prefopt.losses import LossOutput, register_loss

from .test_losses_end_to_end import SAMPLES, run
from .test_reliability import StopAfter


def test_save_total_limit_deletes_old_checkpoints(tmp_path, tiny_model_dir):
    """Rotation used to run inside the staging folder (which holds only the new checkpoint)."""
    result = run(tmp_path, tiny_model_dir, max_steps=5, save_steps=1, save_total_limit=2)
    names = sorted(p.name for p in result.output_dir.iterdir() if p.name.startswith(("checkpoint-", ".staging")))
    assert names == ["checkpoint-4", "checkpoint-5"]


@pytest.mark.parametrize(("ratio", "warmup_steps"), [(1.0, 4), (0.5, 2), (0.0, 0)])
def test_warmup_ratio_is_a_fraction_of_the_run(tmp_path, tiny_model_dir, ratio, warmup_steps):
    """transformers reads warmup_steps=1.0 as one step; warmup_ratio=1.0 must warm up over all 4 steps.

    Linear warm-up over w steps, then linear decay to 0 at step 4: after k scheduler updates the
    rate is lr * k / w while k < w, else lr * (4 - k) / (4 - w). The rate logged at step s is the
    one that step used, after k = s - 1 updates: for w = 4, lr * [0, 1/4, 2/4, 3/4] (rising for
    the whole run; read as one warm-up step it would be [0, 1, 2/3, 1/3]).
    """
    lr = 1e-3
    result = run(tmp_path, tiny_model_dir, max_steps=4, learning_rate=lr, warmup_ratio=ratio)
    assert result.trainer.args.get_warmup_steps(4) == warmup_steps

    def expected(k):  # the rate after k scheduler updates
        return lr * k / warmup_steps if k < warmup_steps else lr * (4 - k) / (4 - warmup_steps)

    logged = [m["learning_rate"] for m in read_metrics(result.output_dir) if "loss" in m]
    assert logged == pytest.approx([expected(k) for k in range(4)], rel=1e-6, abs=1e-12)


def test_skip_nonfinite_budget_survives_resume(tmp_path, tiny_model_dir):
    """One batch may be skipped in the whole run, not one per start: the skip at step 3 is kept in
    checkpoint-3, so a second non-finite loss after resuming stops the run."""
    calls = {"n": 0}

    @register_loss("test_nan_on_calls_3_and_5", needs_reference=False, replace=True)
    def nan_loss(inputs, *, beta: float = 0.1) -> LossOutput:
        calls["n"] += 1
        loss = -inputs.policy_chosen_logps.mean() * beta
        return LossOutput(loss * float("nan") if calls["n"] in (3, 5) else loss)

    settings = dict(loss="test_nan_on_calls_3_and_5", max_steps=6, save_steps=3, skip_nonfinite=1)
    first = run(tmp_path, tiny_model_dir, callbacks=[StopAfter(4)], **settings)  # call 3 = step 3: skipped
    assert first.trainer.skipped_batches[0].startswith("step 3: loss")
    with pytest.raises(PrefoptError, match="non-finite loss at step 4"):  # call 5 = step 4 again, after resume
        run(tmp_path, tiny_model_dir, resume=True, **settings)


def test_kto_summary_names_what_kto_reports(tmp_path, tiny_model_dir, capsys):
    """KTO has no pairs, so no accuracy or margin: the summary shows its desirable and undesirable
    rewards and its KL estimate, never 'None'."""
    run(
        tmp_path,
        tiny_model_dir,
        loss="kto",
        data=[str(SAMPLES / "unpaired.jsonl")],
        max_steps=2,
        batch_size=8,
        logging_steps=2,
    )
    done = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("prefopt: done:"))
    assert "reward desirable" in done and "reward undesirable" in done and "KL estimate" in done
    assert "None" not in done and "accuracy" not in done
    assert "the last logged" not in done  # step 2 was logged: its figures are the final ones


def test_summary_says_when_its_loss_is_from_an_earlier_step(tmp_path, tiny_model_dir, capsys):
    """3 steps logged every 10: only step 1 is logged (logging_first_step), so the closing line's loss
    is step 1's, and it says so instead of passing it off as the final loss."""
    run(tmp_path, tiny_model_dir, max_steps=3, batch_size=4, logging_steps=10)
    done = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("prefopt: done:"))
    assert "(at step 1, the last logged: --logging-steps)" in done


def test_a_plain_dpo_run_prints_only_prefopt_lines_and_the_progress_bar(tmp_path, tiny_model_dir):
    """The console of a plain run, as a user sees it: every line is prefopt's own or tqdm's bar
    (no bitsandbytes note, no deprecation warning, no weight-loading or shard-writing bars)."""
    import os
    import re
    import subprocess
    import sys

    from helpers import train_argv

    argv = train_argv(tiny_model_dir, tmp_path / "out", "standard.jsonl", "--max-steps", "2", "--logging-steps", "1")
    env = {**os.environ, "PREFOPT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "prefopt", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # tqdm redraws with carriage returns; each piece is one state of the bar or one printed line
    pieces = [p.strip() for text in (done.stdout, done.stderr) for line in text.splitlines() for p in line.split("\r")]
    training_bar = re.compile(r"^\d+%\|")  # the training bar has no description; loading bars do
    foreign = [p for p in pieces if p and not p.startswith(("prefopt:", "step ")) and not training_bar.match(p)]
    assert foreign == [], foreign
    assert any(p.startswith("step 2/2") for p in pieces) and any(p.startswith("prefopt: done:") for p in pieces)
