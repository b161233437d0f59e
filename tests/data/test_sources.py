"""Where data comes from (prefopt.data.sources): files, mixture weights, hub ids (offline, from a
local cache the test makes), Dataset objects and lists of dicts, column mapping, ShareGPT turns."""

import json
from pathlib import Path

import datasets
import pytest
from helpers import save_offline_hub_dataset

from prefopt.data import DataError, load_examples, read_records
from prefopt.data.sources import parse_sources, source_fingerprint

SAMPLES = Path(__file__).resolve().parents[2] / "data_samples"
STANDARD = str(SAMPLES / "standard.jsonl")


def test_entries_name_files_weights_and_hub_ids(tmp_path):
    file, weighted = parse_sources([STANDARD, f"{STANDARD}:0.7"])
    assert (file.kind, file.weight) == ("file", None)
    assert (weighted.kind, weighted.label, weighted.weight) == ("file", STANDARD, 0.7)
    hub, split, configured = parse_sources(["org/pairs", "org/pairs:test", "org/pairs:test:0.25"], "en")
    assert (hub.kind, hub.target, hub.split, hub.config) == ("hub", "org/pairs", "train", "en")
    assert (split.split, configured.split, configured.weight) == ("test", "test", 0.25)
    # a missing path stays "no such file", however much it looks like org/name
    for missing in ("data/missing.jsonl", "./x/y", "a/b/c"):
        with pytest.raises(DataError, match=f"^{missing}: no such file$"):
            parse_sources([missing])
    entry = parse_sources([{"path": STANDARD, "weight": 2, "max_samples": 5}])[0]
    assert (entry.weight, entry.max_samples) == (2, 5)
    with pytest.raises(DataError, match=r"^data: weight must be a number > 0, got -1$"):
        parse_sources([{"path": STANDARD, "weight": -1}])


def test_hub_ids_load_offline_from_the_local_cache(tmp_path, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(json.dumps({"question": f"q{i}", "good": "yes", "bad": "no"}) + "\n" for i in range(4))
        + json.dumps({"question": "q9", "good": 5, "bad": "no"})
        + "\n"
    )
    save_offline_hub_dataset(tmp_path / "hf", "someorg/pairs", {"train": rows, "test": rows})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    records = read_records(["someorg/pairs:test"])
    assert len(records) == 5 and records[0].where == "someorg/pairs:test: row 1"
    (source,) = parse_sources(["someorg/pairs"])
    assert source_fingerprint(source)["sha256"].startswith("datasets:")
    # the column mapping, and a bad row named by its row number
    from prefopt.data.formats import normalise
    from prefopt.data.sources import rename_columns

    mapping = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    with pytest.raises(DataError, match=r"^someorg/pairs:test: row 5: field 'chosen' must be a string, got int$"):
        normalise([rename_columns(r, mapping) for r in records])
    with pytest.raises(DataError, match=r"row 1: no column 'answer' \(--columns chosen=answer\); found bad, good"):
        rename_columns(records[0], {"chosen": "answer"})
    with pytest.raises(DataError, match=r"^someorg/missing:train: not in the local Hugging Face datasets cache"):
        read_records(["someorg/missing"])


def test_dataset_objects_and_lists_of_dicts():
    rows = [json.loads(line) for line in Path(STANDARD).read_text().splitlines()]
    from_list, _ = load_examples(rows[:5])
    from_dataset, _ = load_examples(datasets.Dataset.from_list(rows[:5]))
    from_file, _ = load_examples(STANDARD)
    assert [e.prompt for e in from_list] == [e.prompt for e in from_dataset] == [e.prompt for e in from_file[:5]]
    assert from_list[0].where == "data: row 1" and from_dataset[2].where == "data: row 3"
    bad = rows[:2] + [{"prompt": "x", "chosen": ["no"], "rejected": "y"}]
    with pytest.raises(DataError, match=r"^data: row 3: field 'chosen' must be a string, got list$"):
        load_examples(bad)
    fingerprints = {source_fingerprint(s)["sha256"] for s in parse_sources([rows[:5]]) + parse_sources([rows[:4]])}
    assert len(fingerprints) == 2  # contents, not identity


def test_sharegpt_pairs_read_as_conversations(tmp_path):
    """LLaMA-Factory's data/dpo_en_demo.json layout: `conversations` of {from, value} turns and
    `chosen`/`rejected` as one gpt turn each (here with an optional system prompt)."""
    record = {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "2+2?"},
        ],
        "chosen": {"from": "gpt", "value": "4"},
        "rejected": {"from": "gpt", "value": "5"},
        "system": "Be brief.",
    }
    path = tmp_path / "dpo_en_demo.json"
    path.write_text(json.dumps([record]))
    (example,), report = load_examples(path)
    assert report.format == "sharegpt"
    assert example.prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    assert example.chosen == [{"role": "assistant", "content": "4"}]
    assert example.rejected == [{"role": "assistant", "content": "5"}]
    path.write_text(json.dumps([{**record, "chosen": {"from": "observation", "value": "4"}}]))
    with pytest.raises(DataError, match=r"record 1: field 'chosen': speaker 'observation' is not supported"):
        load_examples(path)
    path.write_text(json.dumps([{**record, "conversations": record["conversations"][:2]}]))
    with pytest.raises(DataError, match=r"record 1: field 'conversations' must end with a human/user turn"):
        load_examples(path)


def test_prompts_come_from_python_objects_with_renamed_columns():
    """What the online losses and `prefopt sample` read: a Dataset's `question` column as prompts,
    its other columns kept for the reward."""
    from prefopt.data.formats import load_prompts

    table = datasets.Dataset.from_list([{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}])
    prompts, report = load_prompts(table, columns={"prompt": "question"})
    assert [(p.prompt, p.columns, p.where) for p in prompts] == [
        ("1+1?", {"answer": "2"}, "data: row 1"),
        ("2+2?", {"answer": "4"}, "data: row 2"),
    ]
    assert report.format == "prompt"
