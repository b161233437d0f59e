"""Every bad input gets a clear error naming the file, line/row and field; the CLI exits 2 without a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from prefopt.data import DataError, load_examples

BAD = Path(__file__).parent / "bad_inputs"

CASES = [
    ("malformed.jsonl", r"malformed.jsonl:2: invalid JSON: Expecting ',' delimiter \(column 31\)"),
    ("missing_field.jsonl", r"missing_field.jsonl:2: missing field 'rejected'"),
    ("empty_chosen.jsonl", r"empty_chosen.jsonl:2: field 'chosen' is empty"),
    ("empty_prompt.jsonl", r"empty_prompt.jsonl:1: field 'prompt' is empty"),
    ("bad_label.jsonl", r"bad_label.jsonl:2: field 'label' must be a boolean \(true/false\), got 'yes'"),
    ("not_utf8.jsonl", r"not_utf8.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 16\)"),
    ("empty.jsonl", r"empty.jsonl: the file is empty"),
    ("not_object.json", r"not_object.json: record 1: expected a JSON object, got str"),
    ("empty_cell.csv", r"empty_cell.csv: row 3: field 'chosen' is empty"),
    ("wrong_type.jsonl", r"wrong_type.jsonl:1: field 'chosen' must be a string, got int"),
    ("unknown_format.jsonl", r"unknown_format.jsonl:1: cannot tell the format: .* found answer, question"),
    ("does_not_exist.jsonl", r"does_not_exist.jsonl: no such file"),
]


@pytest.mark.parametrize("name,message", CASES)
def test_bad_input_error_names_file_line_and_field(name, message):
    with pytest.raises(DataError, match=message):
        load_examples(BAD / name)


@pytest.mark.parametrize("name,message", CASES[:3] + CASES[6:7])
def test_cli_reports_bad_input_without_traceback(name, message):
    result = subprocess.run(
        [sys.executable, "-m", "prefopt", "data", "inspect", str(BAD / name)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("prefopt: error: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_label_accepts_csv_spellings(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("prompt,completion,label\nq,a,true\nq,b,False\n")
    examples, report = load_examples(path)
    assert report.format == "unpaired"
    assert [e.label for e in examples] == [True, False]


def test_forced_format_that_does_not_fit_names_the_field(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:1: missing field 'completion'"):
        load_examples(path, fmt="unpaired")


def test_messages_are_validated(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "x"}], "rejected": []}\n'
    )
    with pytest.raises(DataError, match=r"c.jsonl:1: field 'prompt', message 0: needs a 'content' string"):
        load_examples(path)
