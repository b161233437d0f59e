"""The data-at-scale benchmark (prefopt.bench.data): its pairs are distinct copies of the HH-RLHF
split that prefopt reads in full, and its table's data time is the run less the start-up."""

import gzip
import json

from prefopt.bench.data import HH, format_table, make_pairs
from prefopt.data import load_examples


def test_made_pairs_are_distinct_copies_of_the_split(tmp_path):
    """2,312 HH pairs; 2,400 made: copy 0 in full and 88 rows of copy 1, each tagged "[k] ". No
    pair duplicates another, so what is dropped is what HH itself drops: copy 0's and those of
    the first 88 rows again."""
    base = [json.loads(line) for line in gzip.open(HH, "rt")]
    path = make_pairs(tmp_path / "p.jsonl", len(base) + 88)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2400 and rows[0]["chosen"] == "[0] " + base[0]["chosen"]
    assert rows[len(base)]["rejected"] == "[1] " + base[0]["rejected"]
    first_88 = tmp_path / "first88.jsonl"
    first_88.write_text("".join(json.dumps(r) + "\n" for r in base[:88]))
    dropped = [len(base) - len(load_examples(HH)[0]), 88 - len(load_examples(first_88)[0])]
    examples, report = load_examples(path)
    assert report.duplicates == 0
    assert len(examples) == 2400 - sum(dropped)


def test_table_shows_data_time_and_its_ratio():
    rows = [
        {
            "framework": "prefopt",
            "pairs": 10_000,
            "first": {"seconds": 20.0, "data_seconds": 12.0, "peak_rss_gb": 0.7},
            "second": {"seconds": 9.2, "data_seconds": 1.2, "peak_rss_gb": 0.6},
        }
    ]
    table = format_table(rows)
    assert "| 10,000 | prefopt | 20.0 (12.0) | 0.70 | 9.2 (1.2) | 0.60 | 10% |" in table
