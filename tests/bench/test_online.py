"""`python -m prefopt.bench.online` end to end on the tiny model: a base row, a PPO row and a GRPO row with
two updates per sampled batch in fp32; table printed."""

import json

from helpers import save_tiny_model

from prefopt.bench.online import main


def test_bench_online_trains_evaluates_and_tabulates(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "bench.json"
    argv = ["--model", model, "--losses", "ppo,grpo@2:fp32", "--steps", "2", "--held-out", "4", "--num-generations", "2",
            "--max-new-tokens", "4", "--output-dir", str(tmp_path / "runs"), "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    base, ppo, reused = json.loads(out.read_text())["results"]
    assert base["loss"] == "base" and ppo["loss"] == "ppo" and reused["loss"] == "grpo@2:fp32"
    assert 0 <= reused["mismatch_mean_abs"] < 1e-4 and reused["train_s"] > 0  # fp32: sampler == learner
    assert 0 <= ppo["number_match"] <= 1 and ppo["step_s"] > 0 and ppo["peak_mb"] > 0
    assert 0 < ppo["generation_share"] < 1
    assert "| `ppo` |" in capsys.readouterr().out
