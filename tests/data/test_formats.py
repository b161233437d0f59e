"""Loading every file type and format; implicit prompts; dropping identical and duplicate pairs."""

import json
from pathlib import Path

import pytest
from datasets import Dataset

from prefopt.data import load_examples, pairs_to_singles, split_held_out
from prefopt.data.formats import split_implicit_prompt

SAMPLES = Path(__file__).resolve().parents[2] / "data_samples"
HH = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


@pytest.mark.parametrize(
    "name,fmt,count",
    [
        ("standard.jsonl", "standard", 50),
        ("conversational.jsonl", "conversational", 40),
        ("hh_style.jsonl", "implicit", 40),
        ("unpaired.jsonl", "unpaired", 80),
    ],
)
def test_samples_are_detected(name, fmt, count):
    examples, report = load_examples(SAMPLES / name)
    assert report.format == fmt
    assert len(examples) == report.kept == count


def test_hh_style_prompt_is_cut_after_the_last_assistant_marker():
    examples, _ = load_examples(SAMPLES / "hh_style.jsonl")
    first = json.loads((SAMPLES / "hh_style.jsonl").read_text().splitlines()[0])
    assert examples[0].prompt.endswith("\n\nAssistant:")
    assert examples[0].prompt + examples[0].chosen == first["chosen"]
    assert examples[0].prompt + examples[0].rejected == first["rejected"]
    assert examples[0].chosen == " 3 + 24 = 27."


def test_implicit_prompt_without_markers_cuts_at_whitespace():
    prompt, chosen, rejected = split_implicit_prompt("The answer is four.", "The answer is forty.")
    assert (prompt, chosen, rejected) == ("The answer is ", "four.", "forty.")


def test_implicit_conversational_prompt_is_the_shared_messages(tmp_path):
    user = {"role": "user", "content": "hi"}
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps(
            {
                "chosen": [user, {"role": "assistant", "content": "hello!"}],
                "rejected": [user, {"role": "assistant", "content": "go away"}],
            }
        )
        + "\n"
    )
    (example,), report = load_examples(path)
    assert report.format == "implicit"
    assert example.prompt == [user] and example.chosen == [{"role": "assistant", "content": "hello!"}]


def test_csv_parquet_json_folder_and_several_files(tmp_path):
    rows = [json.loads(line) for line in (SAMPLES / "standard.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    dataset.to_csv(tmp_path / "s.csv", index=False)
    dataset.to_parquet(tmp_path / "s.parquet")
    (tmp_path / "s.json").write_text(json.dumps(rows))
    dataset.save_to_disk(tmp_path / "saved")
    for path in ("s.csv", "s.parquet", "s.json", "saved"):
        examples, report = load_examples(tmp_path / path)
        assert (report.format, len(examples)) == ("standard", 50), path
        assert examples[0].chosen == rows[0]["chosen"]
    both, report = load_examples([SAMPLES / "standard.jsonl", tmp_path / "s.csv"])
    assert report.records == 100 and report.duplicates == 50 and len(both) == 50


def test_identical_and_duplicate_pairs_are_dropped_and_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "p", "chosen": "a", "rejected": "a"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    examples, report = load_examples(path)
    assert len(examples) == 1 and report.duplicates == 2 and report.identical_pairs == 1
    assert any("identical" in w for w in report.warnings) and any("duplicate" in w for w in report.warnings)


def test_paired_data_feeds_kto():
    examples, _ = load_examples(SAMPLES / "standard.jsonl")
    singles = pairs_to_singles(examples[:3])
    assert [s.label for s in singles] == [True, False] * 3
    assert singles[1].completion == examples[0].rejected


def test_held_out_split_is_fixed_by_seed():
    examples, _ = load_examples(SAMPLES / "standard.jsonl")
    train_a, held_a = split_held_out(examples, 0.2, seed=3)
    train_b, held_b = split_held_out(examples, 0.2, seed=3)
    assert held_a == held_b and len(held_a) == 10 and len(train_a) == 40
    assert not set(e.where for e in held_a) & set(e.where for e in train_a)
    assert split_held_out(examples, 0.2, seed=4)[1] != held_a


@pytest.mark.skipif(not HH.exists(), reason="shared HH-RLHF data not present")
def test_real_hh_rlhf_file_loads():
    examples, report = load_examples(HH)
    assert report.format == "implicit" and report.records == 2312
    assert report.empty_completions == 4 and len(examples) == 2308
    assert all(e.prompt.endswith("\n\nAssistant:") for e in examples)
