"""`prefopt iterate`: an end-to-end tiny loop, resumed rounds, and a round without pairs."""

import json

import torch
from helpers import save_tiny_model

from prefopt.cli.main import main

REWARDS = """
from prefopt.rewards import register_reward

@register_reward("test_iter_length", replace=True)
def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]

@register_reward("test_iter_constant", replace=True)
def constant(prompts, completions, **columns):
    return [1.0 for _ in completions]
"""


def _setup(tmp_path):
    model = save_tiny_model(tmp_path / "pi0")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Q{i}: say something.", "answer": "x"}) + "\n" for i in range(10))
    )
    module = tmp_path / "iter_rewards.py"
    module.write_text(REWARDS)
    return model, str(prompts), str(module)


def _argv(tmp_path, model, prompts, module, reward, rounds):
    return [
        "iterate", "--model", model, "--prompts", prompts, "--reward", reward, "--reward-module", module,
        "--rounds", str(rounds), "--num-samples", "3", "--max-new-tokens", "6", "--held-out", "2",
        "--prompts-per-round", "4", "--output-dir", str(tmp_path / "loop"), "--max-steps", "1", "--batch-size", "2",
        "--dtype", "float32", "--max-length", "64", "--logging-steps", "1", "--learning-rate", "1e-3",
    ]  # fmt: skip


def test_tiny_loop_end_to_end_and_resumed(tmp_path, capsys):
    model, prompts, module = _setup(tmp_path)
    assert main(_argv(tmp_path, model, prompts, module, "test_iter_length", rounds=1)) == 0
    loop = tmp_path / "loop"
    for name in ("samples.jsonl", "pairs.jsonl", "eval.json", "held_out.jsonl", "run/final/config.json"):
        assert (loop / "round-1" / name).exists(), name
    samples = [json.loads(line) for line in (loop / "round-1" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [f"Q{i}: say something." for i in range(2, 6)]  # held-out 0, 1 never
    assert all(len(s["completions"]) == len(s["rewards"]) == 3 for s in samples)
    held = [json.loads(line) for line in (loop / "round-1" / "held_out.jsonl").read_text().splitlines()]
    assert [h["prompt"] for h in held] == ["Q0: say something.", "Q1: say something."]
    eval1 = json.loads((loop / "round-1" / "eval.json").read_text())
    assert eval1["held_out_mean_reward"] == sum(len(h["completions"][0]) for h in held) / 2
    capsys.readouterr()
    # run again with one more round: round 1 is skipped, round 2 samples with pi_1 on fresh prompts
    assert main(_argv(tmp_path, model, prompts, module, "test_iter_length", rounds=2)) == 0
    out = capsys.readouterr().out
    assert "round 1: done before, skipped" in out and "round 2: 4 prompts sampled by" in out
    assert str(loop / "round-1" / "run" / "final") in out  # pi_1 sampled round 2
    table = out[out.index("round  prompts") :].splitlines()
    assert table[2].startswith("0 ") and table[3].endswith("(done before)") and table[4].startswith("2 ")
    samples2 = [json.loads(line) for line in (loop / "round-2" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples2] == [f"Q{i}: say something." for i in range(6, 10)]
    config2 = (loop / "round-2" / "run" / "config.yaml").read_text()
    assert f"model: {loop / 'round-1' / 'run' / 'final'}" in config2
    assert f"reference_model: {model}" in config2  # pi_0 stays the reference


def test_a_round_without_pairs_says_why(tmp_path, capsys):
    model, prompts, module = _setup(tmp_path)
    assert main(_argv(tmp_path, model, prompts, module, "test_iter_constant", rounds=1)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "prefopt: error: round 1 yielded no training data: all 4 prompts were ties "
        "(every completion of a prompt got the same reward)"
    )


def test_iterate_recipes_run_a_round_on_a_tiny_model(tmp_path):
    """recipes/online/iterative-dpo.yaml and rejection-sampling.yaml as shipped, with the model, reward
    and sizes overridden on the command line: one round each, trained and evaluated."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    model, prompts, module = _setup(tmp_path)
    for name, reward in (("iterative-dpo", "test_iter_length"), ("rejection-sampling", "test_iter_constant")):
        out = tmp_path / name
        argv = [
            "iterate", "--config", str(root / "recipes" / "online" / f"{name}.yaml"), "--model", model,
            "--prompts", prompts, "--reward", reward, "--reward-module", module, "--rounds", "1",
            "--num-samples", "2", "--max-new-tokens", "4", "--held-out", "2", "--prompts-per-round", "4",
            "--output-dir", str(out), "--max-steps", "1", "--max-length", "64",
        ]  # fmt: skip
        if name == "rejection-sampling":  # every constant-reward sample passes the best-of-n threshold
            argv += ["--threshold", "0.5"]
        assert main(argv) == 0, name
        assert (out / "round-1" / "run" / "final").is_dir() and (out / "round-1" / "eval.json").exists(), name


def test_a_rounds_trainer_is_freed_before_the_next_round_samples(tmp_path, monkeypatch):
    """Issue #19 item 9: round t's trainer (model, optimizer, reference copy) stayed alive through
    round t's evaluation and round t+1's sampling. Each round's trained model is watched with a weak
    reference; when the next sampling starts, every earlier one must be gone."""
    import gc
    import weakref

    from prefopt.iterative import iterate as loop
    from prefopt.training import run

    trained, alive_at_sampling = [], []
    real_train, real_sample = run.train, loop._sample

    def watched_train(config, *args, **kwargs):
        result = real_train(config, *args, **kwargs)
        trained.append(weakref.ref(result.trainer.model))
        return result

    def watched_sample(*args, **kwargs):
        gc.collect()
        alive_at_sampling.append(sum(ref() is not None for ref in trained))
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(run, "train", watched_train)  # iterate imports it when it starts
    monkeypatch.setattr(loop, "_sample", watched_sample)
    model, prompts, module = _setup(tmp_path)
    assert main(_argv(tmp_path, model, prompts, module, "test_iter_length", rounds=2)) == 0
    assert len(trained) == 2
    assert alive_at_sampling and all(count == 0 for count in alive_at_sampling), alive_at_sampling


def test_a_killed_round_resumes_its_training_from_the_newest_checkpoint(tmp_path, capsys):
    """`prefopt iterate` in its own process is SIGKILLed once round 1's training has saved a
    checkpoint; run again, the round keeps its samples and pairs, continues training from the
    checkpoint (it says so) and ends with the very weights of an uninterrupted loop."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    model, prompts, module = _setup(tmp_path)
    argv = _argv(tmp_path, model, prompts, module, "test_iter_length", rounds=1)
    argv[argv.index("--max-steps") + 1] = "12"
    argv += ["--save-steps", "2"]
    whole = list(argv)
    whole[whole.index("--output-dir") + 1] = str(tmp_path / "whole")
    assert main(whole) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-m", "prefopt", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    run_dir = tmp_path / "loop" / "round-1" / "run"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and child.poll() is None:
        if (run_dir / "checkpoint-4" / "trainer_state.json").exists():
            break
        time.sleep(0.05)
    assert child.poll() is None, "the loop ended before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (run_dir / "final").exists()
    capsys.readouterr()
    assert main(argv) == 0
    assert "round 1: its training stopped; resuming from its newest checkpoint" in capsys.readouterr().out
    resumed = load_file(run_dir / "final" / "model.safetensors")
    uninterrupted = load_file(tmp_path / "whole" / "round-1" / "run" / "final" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
