"""`prefopt pairs`: selection rules by hand, ties and margins counted, KTO / best-of-N / arena, bad files."""

import json

import pytest
from helpers import save_tiny_model

from prefopt.cli.main import main
from prefopt.data import load_examples
from prefopt.data.files import DataError
from prefopt.iterative.pairs import Scored, battle, read_samples, select_best_of_n, select_pairs, select_unpaired

MSG = [{"role": "user", "content": "What is 2 + 2?"}]


def _samples():
    return [
        Scored("Q1", ["a", "b", "c", "d"], [0.5, 2.0, None, -1.0], {"answer": "x"}, "s:1"),
        Scored("Q2", ["e", "f"], [1.0, 1.0], {}, "s:2"),  # a tie
        Scored(MSG, ["4", "five", "4."], [1.0, 0.0, 0.9], {"answer": "4"}, "s:3"),
    ]


def test_best_worst_by_hand():
    records, report = select_pairs(_samples())
    assert [(r["chosen"], r["rejected"], r["chosen_reward"], r["rejected_reward"]) for r in records] == [
        ("b", "d", 2.0, -1.0),
        ([{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "five"}], 1.0, 0.0),
    ]
    assert records[0]["answer"] == "x" and records[1]["prompt"] == MSG
    assert (report.prompts, report.completions, report.unscorable, report.ties, report.written) == (3, 9, 1, 1, 2)


def test_min_margin_and_all_and_best_random():
    records, report = select_pairs(_samples(), min_margin=1.5)
    assert [(r["chosen"], r["rejected"]) for r in records] == [("b", "d")] and report.below_margin == 1
    records, _ = select_pairs(_samples(), selection="all")
    got = [(r["chosen"], r["rejected"]) for r in records]
    assert got[:3] == [("a", "d"), ("b", "a"), ("b", "d")]
    assert [(c[0]["content"], r[0]["content"]) for c, r in got[3:]] == [("4", "five"), ("4", "4."), ("4.", "five")]
    records, report = select_pairs(_samples(), selection="best-random", seed=1)
    assert records[0]["chosen"] == "b" and records[0]["rejected"] in ("a", "d") and report.ties == 1
    rejected = {select_pairs(_samples(), selection="best-random", seed=s)[0][0]["rejected"] for s in range(20)}
    assert rejected == {"a", "d"}


def test_unpaired_and_best_of_n():
    records, report = select_unpaired(_samples(), threshold=1.0)
    assert [(r["completion"], r["label"]) for r in records[:5]] == [
        ("a", False),
        ("b", True),
        ("d", False),
        ("e", True),
        ("f", True),
    ]
    assert report.written == 8 and report.unscorable == 1
    records, report = select_best_of_n(_samples(), threshold=1.0)
    assert [r["completion"] for r in records] == ["b", "e", [{"role": "assistant", "content": "4"}]]
    assert all(r["label"] is True for r in records)
    records, report = select_best_of_n(_samples(), threshold=1.5)
    assert [r["completion"] for r in records] == ["b"] and report.below_margin == 2


class _Judge:
    """A pairwise reward stand-in: the longer answer wins with p = 0.8, equal lengths tie."""

    def compare(self, prompts, a, b, **columns):
        return [0.8 if len(x) > len(y) else 0.2 if len(x) < len(y) else 0.5 for x, y in zip(a, b, strict=True)]


def test_arena_battles_keep_the_policys_losses():
    samples = [Scored("Q1", ["hi", "hello!!", "hey"], None, {"ref": "hello"}, "s:1")]
    records, report = battle(samples, [("hello", None)], _Judge())
    assert [(r["chosen"], r["rejected"]) for r in records] == [("hello", "hi"), ("hello", "hey")]
    assert (report.battles, report.policy_wins, report.policy_losses) == (3, 1, 2)
    assert records[0]["chosen_reward"] == pytest.approx(0.8) and records[0]["rejected_reward"] == pytest.approx(0.2)
    # a pointwise reward: the reference's score (from another samples file) against each sample's
    samples = [Scored("Q1", ["a", "b"], [0.3, 0.9], {}, "s:1")]
    records, report = battle(samples, [("strong", 0.5)])
    assert [(r["chosen"], r["rejected"], r["chosen_reward"]) for r in records] == [("strong", "a", 0.5)]


class _Length:
    """A pointwise reward stand-in: the answer's length."""

    compare = None

    def __call__(self, prompts, completions, **columns):
        return [float(len(c)) for c in completions]


def test_arena_with_a_reward_scores_the_references_with_it_too():
    """The samples were rescored by --reward (lengths 2 and 4); the other file's best answer "abc"
    has a stored reward of 100 from another reward. Scored by the same reward it is 3: "ab" loses
    one battle, "abcd" wins one. The stored 100 would have made both losses."""
    samples = [Scored("Q1", ["ab", "abcd"], [2.0, 4.0], {}, "s:1")]
    records, report = battle(samples, [("abc", 100.0)], _Length())
    assert [(r["chosen"], r["rejected"], r["chosen_reward"]) for r in records] == [("abc", "ab", 3.0)]
    assert (report.policy_wins, report.policy_losses) == (1, 1)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_pairs_output_trains_as_is(tmp_path, capsys):
    samples = _write(
        tmp_path / "s.jsonl",
        [
            {"prompt": "Q1", "completions": ["a", "b", "c"], "rewards": [0.0, 1.0, None], "finished": [True] * 3},
            {"prompt": "Q2", "completions": ["e", "f"], "rewards": [1.0, 1.0], "finished": [True] * 2},
            {"prompt": MSG, "completions": ["4", "5"], "rewards": [1.0, 0.0], "finished": [True] * 2},
        ],
    )
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--samples", samples, "--output", str(out)]) == 0
    assert "2 pairs from 3 prompts (7 completions; dropped: 1 unscorable, 1 ties, 0 below the margin)" in (
        capsys.readouterr().out
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0] == {"prompt": "Q1", "chosen": "b", "rejected": "a", "chosen_reward": 1.0, "rejected_reward": 0.0}
    examples, report = load_examples(_write(tmp_path / "text.jsonl", rows[:1]))  # what `prefopt train` reads
    assert report.format == "standard" and examples[0].chosen == "b"
    examples, report = load_examples(_write(tmp_path / "chat.jsonl", rows[1:]))
    assert report.format == "conversational" and examples[0].chosen == [{"role": "assistant", "content": "4"}]
    kto = tmp_path / "kto.jsonl"
    assert main(["pairs", "--samples", samples, "--output", str(kto), "--unpaired", "--threshold", "1"]) == 0
    assert load_examples(str(kto))[1].format == "unpaired"
    sft = tmp_path / "sft.jsonl"
    assert main(["pairs", "--samples", samples, "--output", str(sft), "--best-of-n"]) == 0
    assert [json.loads(line)["completion"] for line in sft.read_text().splitlines()][:2] == ["b", "e"]


def test_cli_pairs_rescores_and_battles_a_column(tmp_path, capsys):
    samples = _write(
        tmp_path / "s.jsonl",
        [{"prompt": "What is 1 + 1?", "completions": ["2", "It is 2", "3"], "finished": [True] * 3, "answer": "2"}],
    )
    out = tmp_path / "arena.jsonl"
    argv = ["pairs", "--samples", samples, "--output", str(out), "--against", "answer", "--reward", "exact_match"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("2", "It is 2"), ("2", "3")]
    assert "battles: 3, policy won 0, lost 2" in capsys.readouterr().out
    # against another model's samples file: its best completion is the reference
    strong = _write(
        tmp_path / "strong.jsonl",
        [{"prompt": "What is 1 + 1?", "completions": ["two", "2"], "rewards": [0.0, 1.0], "answer": "2"}],
    )
    out2 = tmp_path / "arena2.jsonl"
    assert (
        main(["pairs", "--samples", samples, "--output", str(out2), "--against", strong, "--reward", "exact_match"])
        == 0
    )
    assert [json.loads(line)["rejected"] for line in out2.read_text().splitlines()] == ["It is 2", "3"]


def test_judge_arena_through_the_cli(tmp_path, capsys):
    from prefopt.rewards import get_reward

    judge = save_tiny_model(tmp_path / "judge", seed=2)
    samples = _write(tmp_path / "s.jsonl", [{"prompt": "Q?", "completions": ["a", "bb", "ccc"], "gold": "dddd"}])
    out = tmp_path / "arena.jsonl"
    argv = ["pairs", "--samples", samples, "--output", str(out), "--against", "gold", "--reward", "judge"]
    code = main(argv + ["--reward-arg", f"model={judge}", "--reward-arg", "against=gold"])
    wins = get_reward("judge", model=judge, against="gold").compare(["Q?"] * 3, ["a", "bb", "ccc"], ["dddd"] * 3)
    lost = [c for c, p in zip(["a", "bb", "ccc"], wins, strict=True) if p < 0.5]
    if lost:
        assert code == 0 and [json.loads(line)["rejected"] for line in out.read_text().splitlines()] == lost
        assert f"battles: 3, policy won {3 - len(lost)}, lost {len(lost)}" in capsys.readouterr().out
    else:
        assert code == 2 and "the policy won or tied all 3 battles" in capsys.readouterr().err


def test_bad_samples_files_and_empty_results_are_one_line_errors(tmp_path, capsys):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "Q", "completions": ["a", "b"], "rewards": [1.0]}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: 2 completions but 1 rewards"):
        read_samples(bad)
    out = str(tmp_path / "p.jsonl")
    assert main(["pairs", "--samples", bad, "--output", out]) == 2
    assert "bad.jsonl:1: 2 completions but 1 rewards" in capsys.readouterr().err
    ties = _write(
        tmp_path / "ties.jsonl", [{"prompt": f"Q{i}", "completions": ["a", "b"], "rewards": [0, 0]} for i in range(3)]
    )
    assert main(["pairs", "--samples", ties, "--output", out]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == "prefopt: error: no pairs written: all 3 prompts were ties (every completion of a prompt got the same reward)"
    )
    assert not (tmp_path / "p.jsonl").exists()
    unscored = _write(tmp_path / "u.jsonl", [{"prompt": "Q", "completions": ["a", "b"]}])
    assert main(["pairs", "--samples", unscored, "--output", out]) == 2
    assert "no 'rewards': sample with --reward NAME, or give pairs a --reward" in capsys.readouterr().err
    assert main(["pairs", "--samples", ties, "--output", out, "--unpaired"]) == 2
    assert "--unpaired needs --threshold" in capsys.readouterr().err


def test_empty_completions_are_dropped_and_counted(tmp_path):
    """A blank answer (the model ended at once) is never written: training drops blank completions, and
    for KTO data it would stop the run ("field 'completion' is empty"). Here the worst answer of Q1 is
    blank, so best-worst pairs the best with the next worst instead; the KTO file trains as it is."""
    samples = [Scored("Q1", ["a", "  ", "b"], [1.0, -5.0, 0.0], {}, "s:1")]
    records, report = select_pairs(samples)
    assert [(r["chosen"], r["rejected"]) for r in records] == [("a", "b")]
    assert report.empty == 1 and "1 empty" in report.summary()
    records, report = select_unpaired(samples, threshold=0.5)
    assert [r["completion"] for r in records] == ["a", "b"] and report.empty == 1
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples, _ = load_examples([str(path)])
    assert len(examples) == 2
    assert "unscorable or empty" in select_pairs([Scored("Q", ["", " "], [1.0, 0.0], {}, "s:1")])[1].why_empty()
