"""`prefopt data feedback`: reacted turns and labels by hand, the keyword rule, the reaction judge, KTO's rule, bad logs."""

import json

import pytest
import torch
from helpers import SAMPLES, save_tiny_model

from prefopt.cli.main import main
from prefopt.data import load_examples
from prefopt.data.files import DataError
from prefopt.iterative.feedback import FeedbackReport, feedback_records, kto_weight_advice, reacted_turns
from prefopt.rewards import get_reward


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


LOGS = [
    # line 1: two answers, both reacted to: "Paris." (thanks) and "12." (wrong)
    {"messages": [_u("Capital of France?"), _a("Paris."), _u("Thanks! And 5 + 5?"), _a("12."), _u("No, that's wrong.")]},
    # line 2 (ShareGPT): one answer, the user moves on: neither; the last answer has no reaction
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                       {"from": "human", "value": "What time is it?"}, {"from": "gpt", "value": "Noon."}]},
    # line 3: no assistant turn
    {"messages": [_u("Anyone there?")]},
    # line 4 (prompt + completion): the assistant opens, then an empty answer, then a good one
    {"prompt": [_a("Welcome!"), _u("Hi")], "completion": [_a(" "), _u("Hello?"), _a("Sorry, hi!"), _u("Great.")]},
]  # fmt: skip


def test_reacted_turns_and_labels_by_hand(tmp_path):
    """Answers: line 1 has 2 (both reacted), line 2 has 2 (one reacted, one unanswered), line 4 has 3
    (the opening one has no request, " " is empty, "Sorry, hi!" reacted): 7 answers, 4 reactions.
    The keyword rule: "Thanks! And 5 + 5?" +1, "No, that's wrong." -1, "What time is it?" 0,
    "Great." +1. So 2 desirable, 1 undesirable, 1 neither: 3 KTO records in file order."""
    path = _write(tmp_path / "logs.jsonl", LOGS)
    records, report = feedback_records([path], get_reward("reaction_keywords"))
    assert [(r["prompt"], r["completion"], r["label"]) for r in records] == [
        ([_u("Capital of France?")], [_a("Paris.")], True),
        ([_u("Capital of France?"), _a("Paris."), _u("Thanks! And 5 + 5?")], [_a("12.")], False),
        ([_a("Welcome!"), _u("Hi"), _a(" "), _u("Hello?")], [_a("Sorry, hi!")], True),
    ]
    assert records[1]["reaction"] == "No, that's wrong."
    assert (report.logs, report.answers, report.reactions, report.written) == (4, 7, 4, 3)
    assert (report.desirable, report.undesirable, report.neither, report.unclear) == (2, 1, 1, 0)
    assert (report.unanswered, report.empty, report.no_request, report.no_assistant) == (1, 1, 1, 1)
    assert report.notes == [f"{path}:3: no assistant turn; skipped"]
    sft, _ = feedback_records([path], get_reward("reaction_keywords"), positive_only=True)
    assert [r["completion"] for r in sft] == [[_a("Paris.")], [_a("Sorry, hi!")]] and all(r["label"] for r in sft)


def test_keyword_rule_by_hand():
    """Negative cues first, cut out of the text, then positive ones: "not right" is -1 (never also
    "right"), "Thanks, but that's wrong" is 1 positive vs 1 negative: 0; a leading "No" is negative."""
    reward = get_reward("reaction_keywords")
    reactions = ["Thanks!", "That's not right.", "No, it's 12.", "Ok.", "Thanks, but that's wrong.", "Meh."]
    assert reward([[]] * 6, reactions) == [1.0, -1.0, -1.0, 0.0, 0.0, 0.0]
    assert get_reward("reaction_keywords", negative="meh, not quite")([[]], ["Meh."]) == [-1.0]


def test_kto_weight_rule_by_hand():
    """n_D = 33, n_U = 32: lambda_D in [32/33, 4/3 * 32/33] = [0.970, 1.293], middle 1.13."""
    advice = kto_weight_advice(33, 32)
    assert "desirable_weight 0.97-1.29, e.g. --loss-arg desirable_weight=1.13" in advice
    assert "no undesirable examples" in kto_weight_advice(5, 0)


def test_the_shipped_logs_make_kto_data_that_trains(tmp_path, capsys):
    """data_samples/feedback_logs.jsonl by the keyword rule: 50 logs, 87 answers, 79 reactions
    (31 desirable, 34 undesirable, 14 neither); its output trains KTO for two steps on a tiny model."""
    out = tmp_path / "kto.jsonl"
    assert main(["data", "feedback", str(SAMPLES / "feedback_logs.jsonl"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "50 logs, 87 assistant turns, 79 with a reaction: 31 desirable, 34 undesirable, 14 neither" in printed
    assert "65 KTO examples" in printed and "desirable_weight=1.28" in printed
    examples, report = load_examples(str(out))  # 4 answers recur in two logs (same history): one each
    assert report.format == "unpaired" and (len(examples), report.duplicates) == (61, 4)
    model = save_tiny_model(tmp_path / "m")
    argv = ["train", "--model", model, "--data", str(out), "--loss", "kto", "--output-dir", str(tmp_path / "run")]
    assert main(argv + ["--max-steps", "2", "--batch-size", "4"]) == 0
    assert main(["data", "feedback", str(SAMPLES / "feedback_logs.jsonl"), "--output", str(out)]) == 2
    assert "exists; choose another --output or pass --overwrite" in capsys.readouterr().err


def test_reaction_judge_reads_its_label_words(tmp_path, capsys):
    """The judge's three probabilities are the softmax of the next-token logits after its question,
    summed over each word's spellings (recomputed here with a plain forward); uncalibrated the label
    is the likeliest word, calibrated the likeliest after dividing by the words' mean probabilities
    for the content-free reactions "N/A", "", "[MASK]" (also recomputed here). When the words hold
    less than min_mass the reaction is unclear, and a run where all are unclear is a one-line error."""
    from prefopt.rewards.judge import question_ids
    from prefopt.rewards.reaction import CONTENT_FREE, REACTION_QUESTION, label_token_ids

    model_dir = save_tiny_model(tmp_path / "judge", seed=4)
    judge = get_reward("reaction_judge", model=model_dir, min_mass=0.0, calibrate=False)
    tokenizer, model = judge._fn.tokenizer, judge._fn.model
    words = label_token_ids(tokenizer)

    def by_hand(reaction):
        ids = torch.tensor([question_ids(tokenizer, REACTION_QUESTION.replace("{reaction}", reaction))])
        with torch.no_grad():
            probabilities = model(input_ids=ids).logits[0, -1].float().softmax(-1)
        return torch.stack([probabilities[w].sum() for w in words])

    conversation, reaction = [_u("2 + 2?"), _a("4")], "Thanks!"
    expected = by_hand(reaction)
    torch.testing.assert_close(judge._fn.label_probabilities([conversation], [reaction])[0], expected)
    assert judge([conversation], [reaction]) == [(1.0, -1.0, 0.0)[int(expected.argmax())]]
    calibrated = get_reward("reaction_judge", model=model_dir, min_mass=0.0)
    prior = torch.stack([by_hand(r) for r in CONTENT_FREE]).mean(0)
    torch.testing.assert_close(calibrated._fn.prior, prior)
    assert calibrated([conversation], [reaction]) == [(1.0, -1.0, 0.0)[int((expected / prior).argmax())]]
    strict = get_reward("reaction_judge", model=model_dir, min_mass=0.5)
    assert float(expected.sum()) < 0.5 and strict([conversation], [reaction]) == [None]
    path = _write(tmp_path / "logs.jsonl", LOGS[:1])
    argv = ["data", "feedback", path, "--output", str(tmp_path / "o.jsonl"), "--judge", model_dir]
    assert main(argv + ["--reward-arg", "min_mass=0.5"]) == 2
    captured = capsys.readouterr()
    assert "2 with a reaction: 0 desirable, 0 undesirable, 0 neither, 2 unclear" in captured.out
    assert captured.err.strip().endswith("the classifier could not label any of the 2 reactions (all unclear)")
    (tmp_path / "t.txt").write_text("How did they take it? {conversation}")
    assert main(argv + ["--judge-template", str(tmp_path / "t.txt")]) == 2
    assert "the template has no {reaction} placeholder" in capsys.readouterr().err


def test_bad_logs_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "o.jsonl")
    bad = _write(tmp_path / "bad.jsonl", [{"messages": [_u("Hi")]}, {"text": "hello"}])
    assert main(["data", "feedback", bad, "--output", out]) == 2
    assert capsys.readouterr().err.strip() == (
        f"prefopt: error: {bad}:2: missing field 'messages' (a conversation log: messages, ShareGPT "
        "conversations, or a conversational prompt and completion; found text)"
    )
    bad = _write(tmp_path / "bad2.jsonl", [{"messages": [{"content": "Hi"}]}])
    with pytest.raises(DataError, match=r"bad2.jsonl:1: field 'messages', message 0: needs a 'role' string"):
        reacted_turns([bad], FeedbackReport())
    only_users = _write(tmp_path / "users.jsonl", [{"messages": [_u("Hi")]}] * 2)
    assert main(["data", "feedback", only_users, "--output", out]) == 2
    assert "nothing written: none of the 2 logs has an assistant turn" in capsys.readouterr().err
    assert main(["data", "feedback", only_users, "--output", out, "--judge-template", "t.txt"]) == 2
    assert "--judge-template goes with --judge MODEL" in capsys.readouterr().err
