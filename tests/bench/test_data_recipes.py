"""The data-recipes evidence (prefopt.bench.data_recipes): its held-out pairs are questions no log
asks, and its labeller agreement counts each annotated reaction once."""

import json

from prefopt.bench.data_recipes import _held_out_pairs, agreement
from prefopt.bench.samples import sample_path
from prefopt.data import load_examples
from prefopt.rewards import get_reward


def test_held_out_pairs_are_questions_no_log_asks(tmp_path):
    """standard.jsonl has 50 questions; the logs ask the first 40 of make_samples' order, so 10 are
    held out, none of them in any log, each a conversational pair that loads for `prefopt eval`."""
    logs = sample_path("feedback_logs.jsonl")
    path = _held_out_pairs(logs, tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    asked = " ".join(m["content"] for line in logs.read_text().splitlines() for m in json.loads(line)["messages"])
    assert len(rows) == 10 and not any(r["prompt"][0]["content"] in asked for r in rows)
    assert load_examples(str(path))[1].format == "conversational"


def test_keyword_agreement_with_the_annotation():
    """79 annotated reactions: 34 positive, 34 negative, 11 neither. The keyword rule misses the
    three bare "Cool." (no cue word: neither) and gets the other 76: 76 / 79."""
    result = agreement(sample_path("feedback_logs.jsonl"), get_reward("reaction_keywords"))
    assert result["reactions"] == 79
    assert result["confusion"] == {
        "negative->negative": 34,
        "neither->neither": 11,
        "positive->neither": 3,
        "positive->positive": 31,
    }
    assert abs(result["accuracy"] - 76 / 79) < 1e-12


def test_held_out_sums_are_right_against_wrong_and_unasked(tmp_path):
    """The 81 single-digit sums less those a log asks; each pair's chosen sum is right, its rejected
    one wrong, both in the logs' answer style ("4 + 6 = 10.")."""
    from prefopt.bench.data_recipes import _held_out_sums

    logs = sample_path("feedback_logs.jsonl")
    rows = [json.loads(line) for line in _held_out_sums(logs, tmp_path).read_text().splitlines()]
    asked = " ".join(m["content"] for line in logs.read_text().splitlines() for m in json.loads(line)["messages"])
    unasked = [f"What is {a} + {b}?" for a in range(1, 10) for b in range(1, 10) if f"What is {a} + {b}?" not in asked]
    assert sorted(r["prompt"][0]["content"] for r in rows) == sorted(unasked) and len(rows) > 70
    for row in rows:
        a, b = map(int, row["prompt"][0]["content"][len("What is ") : -1].split(" + "))
        assert row["chosen"][0]["content"] == f"{a} + {b} = {a + b}."
        wrong = int(row["rejected"][0]["content"].split("= ")[1].rstrip("."))
        assert wrong != a + b
