"""`python -m prefopt.bench.grpo` end to end on a tiny random Llama: both workers, each in its own process."""

import json

import pytest
from helpers import save_tiny_model

from prefopt.bench.grpo import main

PROMPTS = [
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)}
    for a, b in ((1, 2), (3, 4), (5, 6), (7, 1))
]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))  # the workers inherit it


def test_bench_grpo_measures_both_methods(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    out = tmp_path / "grpo.json"
    argv = ["--model", model, "--prompts", str(prompts), "--steps", "2", "--num-generations", "4"]
    assert main([*argv, "--max-new-tokens", "8", "--batch-size", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"prefopt", "trl"}
    for method, result in doc["results"].items():
        assert len(result["step_times"]) == 2, method
        assert all(t > 0 for t in result["step_times"]), method
        assert result["peak_bytes"] > 0, method
        assert len(result["generation_s"]) == 2 and all(g > 0 for g in result["generation_s"]), method
        summary = doc["summary"][method]
        assert summary["mean_step_s"] > 0 and summary["peak_gib"] > 0, method
        assert 0 < summary["generation_share"] < 1, method
    assert doc["results"]["trl"]["trl_bf16"] is False  # the same precision as prefopt's fp32
    assert doc["ratios"]["speed"] > 0 and doc["ratios"]["memory"] > 0
    assert "prefopt vs TRL" in capsys.readouterr().out
