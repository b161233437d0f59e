"""Training from the data people have: a second run reads the token cache, Python objects and lists
of dicts train, --columns renames fields, YAML mixtures are drawn and reported in the summary."""

import json

import yaml
from helpers import SAMPLES

from prefopt.cli.main import main

from .test_losses_end_to_end import run


def _rows():
    return [json.loads(line) for line in (SAMPLES / "standard.jsonl").read_text().splitlines()]


def test_a_second_run_reads_the_token_cache_and_trains_the_same(tmp_path, tiny_model_dir, capsys):
    first = run(tmp_path / "a", tiny_model_dir)
    assert "prefopt: train: 50 examples, token ids cached in" in capsys.readouterr().out
    second = run(tmp_path / "b", tiny_model_dir)
    assert "prefopt: train: 50 examples, token ids read from" in capsys.readouterr().out
    assert second.metrics["loss"] == first.metrics["loss"]  # the same ids, the same order, the same steps


def test_a_list_of_dicts_trains_like_its_file(tmp_path, tiny_model_dir):
    from_file = run(tmp_path / "file", tiny_model_dir)
    from_rows = run(tmp_path / "rows", tiny_model_dir, data=_rows())
    assert from_rows.metrics["loss"] == from_file.metrics["loss"]
    assert "<in memory: a list of 50 records>" in (tmp_path / "rows" / "run" / "config.yaml").read_text()


def test_columns_rename_a_datasets_fields(tmp_path, tiny_model_dir, capsys):
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(
        "".join(
            json.dumps({"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]}) + "\n" for r in _rows()
        )
    )
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(renamed), "--output-dir", str(tmp_path / "out")]
    argv += ["--max-steps", "1", "--batch-size", "2", "--max-length", "96"]
    assert main([*argv, "--columns", "prompt=question,chosen=good,rejected=bad"]) == 0
    assert "prefopt: train: 50 examples" in capsys.readouterr().out
    code = main([*argv, "--overwrite", "--columns", "prompt=query"])
    assert code == 2
    assert (
        "renamed.jsonl:1: no column 'query' (--columns prompt=query); found bad, good, question"
        in capsys.readouterr().err
    )


def test_a_yaml_mixture_is_drawn_and_reported(tmp_path, tiny_model_dir):
    """standard.jsonl (50 pairs) capped at 10 and hh_style.jsonl (40), weights 1:1: the largest
    mixture without repeats is min(10/0.5, 40/0.5) = 20 examples, 10 from each."""
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "loss": "dpo",
                "model": str(tiny_model_dir),
                "data": [
                    {"path": str(SAMPLES / "standard.jsonl"), "weight": 1, "max_samples": 10},
                    {"path": str(SAMPLES / "hh_style.jsonl"), "weight": 1},
                ],
                "output_dir": str(tmp_path / "out"),
                "max_steps": 1,
                "batch_size": 2,
                "max_length": 256,
            }
        )
    )
    assert main(["train", "--config", str(recipe)]) == 0
    data = json.loads((tmp_path / "out" / "summary.json").read_text())["data"]
    assert [(s["kept"], s["used"]) for s in data["sources"]] == [(50, 10), (40, 10)]
    assert data["train_examples"] == 20
