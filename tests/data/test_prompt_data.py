"""Prompt-only data: the fourth format, preference files as prompts, and `data inspect` on them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import byte_tokenizer

from prefopt.data import DataError, load_examples
from prefopt.data.formats import load_prompts
from prefopt.data.inspection import format_report, inspect_data

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "data_samples"


def test_arithmetic_prompts_keep_their_answer_column():
    prompts, report = load_prompts(SAMPLES / "arithmetic.jsonl")
    assert report.format == "prompt" and report.records == report.kept == 81 and report.columns == ["answer"]
    first = prompts[0]
    assert first.prompt == [{"role": "user", "content": "What is 4 + 6?"}] and first.columns == {"answer": "10"}
    assert first.where.endswith("arithmetic.jsonl:1") and first.conversational


@pytest.mark.parametrize("name", ["standard.jsonl", "conversational.jsonl", "hh_style.jsonl", "unpaired.jsonl"])
def test_preference_files_serve_as_prompts(name):
    prompts, report = load_prompts(SAMPLES / name)
    rows = [json.loads(line) for line in (SAMPLES / name).read_text().splitlines()]
    assert report.format != "prompt" and report.records == len(rows)
    assert report.kept == len({json.dumps(p.prompt) for p in prompts}) == report.records - report.duplicates
    if name == "unpaired.jsonl":  # 50 prompts, 30 of them twice
        assert report.duplicates == 30 and set(prompts[0].columns) == {"completion", "label"}
    elif name == "hh_style.jsonl":
        assert prompts[0].prompt.endswith("\n\nAssistant:") and set(prompts[0].columns) == {"chosen", "rejected"}
    else:
        assert prompts[0].prompt == rows[0]["prompt"] and prompts[0].columns["chosen"] == rows[0]["chosen"]


def test_prompts_file_without_prompt_is_a_located_error(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "2+2?", "answer": "4"}\n')
    with pytest.raises(DataError, match=r"q.jsonl:1: missing field 'prompt' \(found answer, question\)"):
        load_prompts(path)
    path.write_text('{"prompt": "2+2?", "answer": "4"}\n{"answer": "5"}\n')
    with pytest.raises(DataError, match=r"q.jsonl:2: missing field 'prompt'"):
        load_prompts(path)


def test_training_on_prompt_only_data_says_what_to_do():
    with pytest.raises(DataError, match="prompt-only data .* cannot be trained on directly: sample and score"):
        load_examples(SAMPLES / "arithmetic.jsonl")


def test_inspect_reports_prompt_only_files():
    result = inspect_data(SAMPLES / "arithmetic.jsonl", byte_tokenizer, max_length=64, max_prompt_length=30)
    assert result["format"] == "prompt" and result["usable"] == 81 and result["columns"] == ["answer"]
    tok = byte_tokenizer()
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "What is 4 + 6?"}], tokenize=False, add_generation_prompt=True
    )
    n = len(tok(rendered, add_special_tokens=False)["input_ids"])  # "1 + 1" .. "9 + 9": all the same length
    assert result["token_lengths"]["prompt"] == {"p50": n, "p90": n, "p99": n, "p100": n}
    assert result["truncated"] == 81 and n > 30
    report = format_report(result)
    assert "prompt-only" in report and "extra columns:    answer" in report


def test_cli_inspect_prompt_only(tmp_path):
    folder = tmp_path / "tok"
    byte_tokenizer().save_pretrained(folder)
    (folder / "config.json").write_text("{}")
    out = subprocess.run(
        [sys.executable, "-m", "prefopt", "data", "inspect", str(SAMPLES / "arithmetic.jsonl"), "--model", str(folder)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "format:           prompt" in out and "records:          81" in out
