"""`prefopt data inspect` on every sample file (and the real HH-RLHF file when present)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import byte_tokenizer

from prefopt.data.inspection import format_report, inspect_data

ROOT = Path(__file__).resolve().parents[2]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def test_inspect_standard_with_byte_tokenizer():
    result = inspect_data(ROOT / "data_samples" / "standard.jsonl", byte_tokenizer, max_length=30)
    assert result["format"] == "standard" and result["records"] == result["usable"] == 50
    # one token per byte: the longest prompt in tokens is the longest in bytes
    rows = [json.loads(line) for line in (ROOT / "data_samples" / "standard.jsonl").read_text().splitlines()]
    assert result["token_lengths"]["prompt"]["p100"] == max(len(r["prompt"].encode()) for r in rows)
    assert result["fit"] + result["dropped_too_long"] == 50
    assert result["dropped_too_long"] == sum(len(r["prompt"].encode()) >= 30 for r in rows) > 0
    assert "format:           standard" in format_report(result)


def test_inspect_unpaired_label_balance():
    result = inspect_data(ROOT / "data_samples" / "unpaired.jsonl", byte_tokenizer, max_length=512)
    assert result["labels"] == {"desirable": 50, "undesirable": 30}
    assert set(result["token_lengths"]) == {"prompt", "completion"}
    assert result["truncated"] == result["dropped_too_long"] == 0


@pytest.mark.parametrize(
    "name,fmt,max_length",
    [
        ("standard.jsonl", "standard", 24),
        ("conversational.jsonl", "conversational", 40),
        ("hh_style.jsonl", "implicit", 24),
        ("unpaired.jsonl", "unpaired", 24),
    ],
)
def test_cli_inspect_each_sample_with_smollm2(name, fmt, max_length, smollm2_tokenizer):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt",
            "data",
            "inspect",
            str(ROOT / "data_samples" / name),
            "--json",
            "--max-length",
            str(max_length),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout)
    assert report["format"] == fmt
    assert report["fit"] + report["dropped_too_long"] == report["usable"] > 0
    assert report["truncated"] > 0  # some completions are longer than 24 tokens with their prompt
    assert report["token_lengths"]["prompt"]["p50"] <= report["token_lengths"]["prompt"]["p100"]


@pytest.mark.skipif(not HH.exists(), reason="shared HH-RLHF data not present")
def test_inspect_real_hh_rlhf(smollm2_tokenizer):
    result = inspect_data(HH, lambda: smollm2_tokenizer, max_length=256, max_prompt_length=128)
    assert result["format"] == "implicit" and result["records"] == 2312 and result["usable"] == 2308
    assert result["fit"] == 2308 and 0 < result["truncated"] < 2308
    assert result["token_lengths"]["prompt"]["p100"] > 128
