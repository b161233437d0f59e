"""`python -m prefopt.bench.experiments NAME` runs end to end (tiny model, sample pairs, two steps)."""

import json
from pathlib import Path

import pytest
from helpers import png_size

from prefopt.bench.experiments import EXPERIMENTS, KTO_RATIO, main, plot_experiment

SAMPLES = Path(__file__).resolve().parents[2] / "data_samples"


def test_experiment_trains_probes_and_plots(tmp_path, tiny_model_dir):
    name = "kto-imbalance"  # two runs, the unpaired 1:10 data and the paired held-out probes
    argv = [name, "--model", tiny_model_dir, "--data", str(SAMPLES / "standard.jsonl"), "--output-dir",
            str(tmp_path / "runs"), "--figures", str(tmp_path / "fig"), "--steps", "2", "--pairs", "20",
            "--held-out", "4", "--probe-every", "1", "--max-length", "96", "--max-prompt-length", "48"]  # fmt: skip
    assert main(argv) == 0
    assert png_size(tmp_path / "fig" / f"{name}.png")[0] > 0
    for folder, *_ in EXPERIMENTS[name]:
        probes = [json.loads(line) for line in (tmp_path / "runs" / name / f"{folder}.held_out.jsonl").open()]
        assert [p["step"] for p in probes] == [0, 1, 2]
        assert probes[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # before training: the policy is the reference
        assert probes[-1]["kl"] > 0
    rows = [json.loads(line) for line in (tmp_path / "runs" / name / "data" / "kto.jsonl").open()]
    desirable = sum(r["label"] for r in rows)
    assert len(rows) - desirable == KTO_RATIO * desirable  # 1:10
    # every other experiment's figure draws from the same two files per run
    runs = {folder: tmp_path / "runs" / name / folder for folder, *_ in EXPERIMENTS[name]}
    for other in ("tdpo", "dpo-vs-dpop", "orpo"):
        assert png_size(plot_experiment(other, runs, tmp_path / "fig" / f"{other}.png"))[0] > 0
