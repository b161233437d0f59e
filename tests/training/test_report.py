"""`prefopt report`: a valid PNG with the panels; runs overlaid; online folders; tensorboard events."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import png_size

from prefopt.cli.main import main
from prefopt.training.report import ONLINE_PANELS, PANELS, panel_titles, plot_runs, read_run, write_run_report
from training.test_losses_end_to_end import run

SAMPLES = Path(__file__).resolve().parents[2] / "data_samples"


def _run(root, model_dir, name, **overrides):
    return run(root, model_dir, output_dir=str(root / name), max_steps=overrides.pop("max_steps", 4), **overrides)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("report_runs")
    dpo = _run(root, tiny_model_dir, "dpo", loss="dpo", eval_fraction=0.2, eval_steps=2)
    tdpo = _run(root, tiny_model_dir, "tdpo", loss="tdpo1")
    return dpo.output_dir, tdpo.output_dir


def test_report_is_a_valid_png_with_every_panel(two_runs, tmp_path):
    from PIL import Image

    out = plot_runs(list(two_runs), tmp_path / "sub" / "both.png")
    width, height = png_size(out)
    with Image.open(out) as image:
        image.verify()
    assert (width, height) == (1404, 918)  # 3 x 3 panels at 90 dpi
    assert panel_titles(list(two_runs)) == [title for title, _, _ in PANELS]  # offline runs: no online panels


def test_runs_are_labelled_by_loss_and_evaluations_marked(two_runs, tmp_path):
    dpo, tdpo = (read_run(folder) for folder in two_runs)
    assert (dpo.label, tdpo.label) == ("dpo", "tdpo1")
    steps, values = dpo.series("eval_rewards/margins")
    assert steps[0] == 0 and values[0] == pytest.approx(0.0, abs=1e-6)  # before training, from summary.json
    assert 2 in steps and 4 in steps  # eval_steps=2 over 4 steps
    assert tdpo.series("kl/chosen")[0] == [1, 2, 3, 4]
    # two runs of one loss also name their folders
    copy = tmp_path / "dpo-again"
    shutil.copytree(two_runs[0], copy)
    assert main(["report", str(two_runs[0]), str(copy), "--output", str(tmp_path / "same.png")]) == 0
    png_size(tmp_path / "same.png")


def test_train_writes_report_png_and_keeps_a_users_own(two_runs, tmp_path):
    assert png_size(Path(two_runs[0]) / "report.png")[0] > 0
    folder = tmp_path / "theirs"
    shutil.copytree(two_runs[1], folder)
    (folder / "report.png").write_bytes(b"my own picture")
    assert write_run_report(folder) is None
    assert (folder / "report.png").read_bytes() == b"my own picture"
    (folder / "metrics.jsonl").unlink()
    (folder / "report.png").unlink()
    assert write_run_report(folder) is None  # cannot plot: says so, raises nothing


def test_online_folder_gets_reward_and_length_panels(two_runs, tmp_path):
    """An `iterate` folder: rounds' runs end to end, held-out reward and answer length per round."""
    root = tmp_path / "iterate"
    for t, reward in ((1, 0.25), (2, 0.5)):
        round_dir = root / f"round-{t}"
        shutil.copytree(two_runs[0], round_dir / "run")
        (round_dir / "eval.json").write_text(json.dumps({"model": "m", "held_out_mean_reward": reward}))
        (round_dir / "held_out.jsonl").write_text(json.dumps({"completion_ids": [[1, 2, 3], [4]]}) + "\n")
    run = read_run(root)
    assert run.label == "dpo (online)"
    assert run.series("held_out_reward") == ([4, 8], [0.25, 0.5])  # at the step each round ended
    assert run.series("held_out_length") == ([4, 8], [2.0, 2.0])
    assert max(run.series("loss")[0]) == 8
    titles = panel_titles([root])
    assert titles[-2:] == [title for title, _, _ in ONLINE_PANELS]
    width, height = png_size(plot_runs([root], tmp_path / "online.png"))
    assert (width, height) == (1404, 1224)  # a fourth row for the online panels


def test_report_of_a_folder_without_metrics_is_an_error(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--output", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_report_to_tensorboard_writes_an_event_file(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _run(tmp_path, tiny_model_dir, "tb", loss="dpo", max_steps=3, report_to=["tensorboard"])
    events = list((result.output_dir / "runs").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert "train/loss" in tags and "train/rewards/margins" in tags
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 3]
