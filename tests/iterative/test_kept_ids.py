"""Sampled token ids travel from `prefopt sample` through `prefopt pairs` into training (issue #11).

DESIGN §6: completion token ids are kept, never re-tokenised text. Decoding ids and tokenizing
the text again does not always give them back: a model may sample a non-canonical split ("T" +
"he" where "The" is one token), a completion cut at max_new_tokens inside a multi-byte
character decodes to U+FFFD, and a cut completion has no EOS. Measured once with SmolLM2-135M-
Instruct on data_samples/arithmetic.jsonl (81 prompts x 4 samples, 32 new tokens, T=1): 23 of
324 completions re-tokenise to other tokens, and 220 more differ only by the EOS that the text
path appends to a completion cut at max_new_tokens.
"""

import json

import pytest
from helpers import byte_tokenizer, save_tiny_model

from prefopt.cli.main import main
from prefopt.data import DataError, PairExample, PreferenceTokenizer, load_examples, pairs_to_singles
from prefopt.iterative.pairs import read_samples

MSG = [{"role": "user", "content": "What is 4 + 6?"}]
TEXT_PROMPT = "Q: what is 4 + 6?\nA:"


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _sampled(tok) -> list[dict]:
    """A samples file's lines, as `prefopt sample` writes them, whose completion ids re-tokenising
    the decoded text does not give back (SmolLM2's tokenizer)."""
    eos = tok.eos_token_id
    render = PreferenceTokenizer(tok, 2).prompt_ids
    # chat prompt: a non-canonical split, finished; and a completion cut inside a two-token emoji
    split = _enc(tok, "T") + _enc(tok, "he") + _enc(tok, " answer is 10.") + [eos]
    cut = _enc(tok, "It is 10 ") + _enc(tok, "🙂")[:1]
    # text prompt: " ans" + "wer" where " answer" is one token
    text_split = _enc(tok, " ans") + _enc(tok, "wer") + _enc(tok, " 10") + [eos]
    text_plain = _enc(tok, " 11") + [eos]
    return [
        {
            "prompt": MSG,
            "answer": "10",
            "prompt_ids": render(MSG)[0],
            "completions": [tok.decode(split[:-1]), tok.decode(cut)],
            "completion_ids": [split, cut],
            "finished": [True, False],
            "rewards": [1.0, 0.0],
        },
        {
            "prompt": TEXT_PROMPT,
            "prompt_ids": render(TEXT_PROMPT)[0],
            "completions": [tok.decode(text_split[:-1]), tok.decode(text_plain[:-1])],
            "completion_ids": [text_split, text_plain],
            "finished": [True, True],
            "rewards": [1.0, 0.0],
        },
    ]


def _folder(path):
    path.mkdir()
    return path


def _text_only(example: PairExample) -> PairExample:
    return PairExample(example.prompt, example.chosen, example.rejected, example.where)


def _pairs(tmp_path, rows: list[dict], *flags: str) -> list:
    """`prefopt pairs` on each row's own samples file (a chat prompt and a text prompt are two
    formats, one per file): (records written, examples as training reads them)."""
    records, examples = [], []
    for i, row in enumerate(rows):
        out = tmp_path / f"out{i}{'-'.join(flags)}.jsonl"
        samples = _write(tmp_path / f"samples{i}.jsonl", [row])
        assert main(["pairs", "--samples", samples, "--output", str(out), "--overwrite", *flags]) == 0
        records += _read(out)
        examples += load_examples(str(out))[0]
    return records, examples


def test_pairs_carry_the_sampled_ids_and_training_uses_them(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    rows = _sampled(tok)
    (split, cut), (text_split, text_plain) = rows[0]["completion_ids"], rows[1]["completion_ids"]
    assert rows[0]["completions"] == ["The answer is 10.", "It is 10 \ufffd"]
    assert rows[1]["completions"] == [" answer 10", " 11"]
    pairs, examples = _pairs(tmp_path, rows)
    assert [(p["chosen_ids"], p["rejected_ids"]) for p in pairs] == [(split, cut), (text_split, text_plain)]
    assert [p["prompt_ids"] for p in pairs] == [r["prompt_ids"] for r in rows]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "The answer is 10."}] and pairs[0]["answer"] == "10"

    # the test means something: re-tokenising the text gives other ids for three of the four
    text = PreferenceTokenizer(tok, 512).all([_text_only(e) for e in examples], log=None)
    assert text[0].chosen_ids != split and text[0].rejected_ids != cut and text[1].chosen_ids != text_split
    assert text[0].rejected_ids[-1] == tok.eos_token_id  # the text path closes the cut completion

    notes = []
    tokenizing = PreferenceTokenizer(tok, 512)
    items = tokenizing.all(examples, log=notes.append)
    assert [(i.chosen_ids, i.rejected_ids) for i in items] == [(split, cut), (text_split, text_plain)]
    assert [i.prompt_ids for i in items] == [r["prompt_ids"] for r in rows]
    assert cut[-1] != tok.eos_token_id  # cut at max_new_tokens: no EOS appended
    assert (tokenizing.report.from_ids, tokenizing.report.ids_mismatch) == (4, 0)
    assert notes == ["prefopt: data: 4 completions used their sampled token ids"]

    # truncation applies to sampled ids as to text: completions cut at the end to fit max_length
    room = len(rows[0]["prompt_ids"]) + 3
    fitted = PreferenceTokenizer(tok, room).pair(examples[0], 0)
    assert (fitted.chosen_ids, fitted.rejected_ids) == (split[:3], cut[:3])

    # KTO data (and KTO from pairs) and best-of-N SFT data carry completion_ids the same way
    kto, kto_examples = _pairs(tmp_path, rows, "--unpaired", "--threshold", "0.5")
    sft, _ = _pairs(tmp_path, rows, "--best-of-n")
    assert [r["completion_ids"] for r in kto] == [split, cut, text_split, text_plain]
    assert [r["completion_ids"] for r in sft] == [split, text_split]
    for singles in (kto_examples, pairs_to_singles(examples)):
        got = [s.completion_ids for s in PreferenceTokenizer(tok, 512).all(singles, log=None)]
        assert sorted(got) == sorted([split, cut, text_split, text_plain])


def test_a_prompt_cut_at_sampling_passes_when_training_cuts_it_the_same(smollm2_tokenizer):
    tok = smollm2_tokenizer
    row = _sampled(tok)[0]
    cut_prompt = row["prompt_ids"][-8:]  # `prefopt sample --max-prompt-length 8`
    example = PairExample(MSG, "The answer is 10.", "It is 10 \ufffd", "x", tuple(cut_prompt), *row["completion_ids"])
    same = PreferenceTokenizer(tok, 512, max_prompt_length=8)
    pair = same.pair(example, 0)
    assert (pair.prompt_ids, pair.chosen_ids, same.report.from_ids) == (cut_prompt, row["completion_ids"][0], 2)
    longer = PreferenceTokenizer(tok, 512)  # training would see more prompt than sampling did: text
    assert longer.pair(example, 0).chosen_ids != row["completion_ids"][0] and longer.report.ids_mismatch == 1


def test_ids_of_another_tokenizer_or_template_fall_back_to_the_text_and_are_counted(smollm2_tokenizer, tmp_path):
    tok, other = smollm2_tokenizer, byte_tokenizer()
    eos = other.eos_token_id
    rows = [
        {  # another tokenizer (one token per byte) and another chat template
            "prompt": MSG,
            "chosen": [{"role": "assistant", "content": "10"}],
            "rejected": [{"role": "assistant", "content": "eleven"}],
            "prompt_ids": PreferenceTokenizer(other, 2).prompt_ids(MSG)[0],
            "chosen_ids": _enc(other, "10") + [eos],
            "rejected_ids": _enc(other, "eleven") + [eos],
        },
        {  # SmolLM2's tokenizer, but a template without SmolLM2's default system turn
            "prompt": MSG,
            "chosen": [{"role": "assistant", "content": "Ten"}],
            "rejected": [{"role": "assistant", "content": "It is 10 \ufffd"}],
            "prompt_ids": _enc(tok, "<|im_start|>user\nWhat is 4 + 6?<|im_end|>\n<|im_start|>assistant\n"),
            "chosen_ids": _enc(tok, "T") + _enc(tok, "en") + [tok.eos_token_id],
            "rejected_ids": _enc(tok, "It is 10 ") + _enc(tok, "🙂")[:1],
        },
    ]
    examples, _ = load_examples(_write(tmp_path / "pairs.jsonl", rows))
    notes = []
    tokenizing = PreferenceTokenizer(tok, 512)
    items = tokenizing.all(examples, log=notes.append)
    text = PreferenceTokenizer(tok, 512).all([_text_only(e) for e in examples], log=None)
    assert [(i.prompt_ids, i.chosen_ids, i.rejected_ids) for i in items] == [
        (t.prompt_ids, t.chosen_ids, t.rejected_ids) for t in text
    ]
    assert (tokenizing.report.from_ids, tokenizing.report.ids_mismatch) == (0, 2)
    assert notes == [
        "prefopt: data: 0 completions used their sampled token ids; 2 examples carried ids of another "
        "tokenizer or chat template (prompt_ids differ) and were tokenized from their text"
    ]
    # completion ids without prompt ids cannot be checked: text, counted
    bare = PairExample(MSG, "Ten", "Eleven", "x", None, (68, 2), None)
    checker = PreferenceTokenizer(tok, 512)
    prompt_ids, prompt_text = checker.prompt_ids(MSG)
    assert checker.pair(bare, 0).chosen_ids == checker.completion_ids(MSG, prompt_text, prompt_ids, "Ten")
    assert checker.report.ids_mismatch == 1


def test_files_without_ids_behave_as_before(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    rows = _sampled(tok)
    older = [{k: v for k, v in r.items() if k != "prompt_ids"} for r in rows]  # completion_ids only
    plain = [{k: v for k, v in r.items() if k not in ("prompt_ids", "completion_ids")} for r in rows]
    for name, samples in (("older", older), ("plain", plain)):
        records, examples = _pairs(_folder(tmp_path / name), samples)
        assert not any(key.endswith("_ids") for row in records for key in row), name
        assert all(e.prompt_ids is e.chosen_ids is e.rejected_ids is None for e in examples)
        notes = []
        tokenizing = PreferenceTokenizer(tok, 512)
        items = tokenizing.all(examples, log=notes.append)
        text = PreferenceTokenizer(tok, 512).all([_text_only(e) for e in examples], log=None)
        assert [(i.chosen_ids, i.rejected_ids) for i in items] == [(t.chosen_ids, t.rejected_ids) for t in text]
        assert notes == [] and (tokenizing.report.from_ids, tokenizing.report.ids_mismatch) == (0, 0)


def test_arena_battles_keep_ids_for_the_policys_side_only(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    rows = _sampled(tok)[:1]
    out = tmp_path / "arena.jsonl"
    argv = ["pairs", "--samples", _write(tmp_path / "s.jsonl", rows), "--output", str(out)]
    assert main(argv + ["--against", "answer", "--reward", "exact_match"]) == 0
    pairs = _read(out)  # the reference "10" beats both samples: the policy's answers are rejected
    assert [p["rejected_ids"] for p in pairs] == rows[0]["completion_ids"]
    assert all("chosen_ids" not in p and p["prompt_ids"] == rows[0]["prompt_ids"] for p in pairs)
    tokenizing = PreferenceTokenizer(tok, 512)
    items = tokenizing.all(load_examples(str(out))[0], log=None)
    assert [i.rejected_ids for i in items] == rows[0]["completion_ids"] and tokenizing.report.from_ids == 2
    assert all(i.chosen_ids == _enc(tok, "10") + [tok.eos_token_id] for i in items)  # the reference, from text


def test_stale_id_columns_do_not_leak_and_bad_ids_are_one_line_errors(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    row = _sampled(tok)[1]
    # a pairs file used as prompts brings its chosen_ids along as a column; without prompt ids they are dropped
    stale = {k: v for k, v in row.items() if k != "prompt_ids"} | {"chosen_ids": [1, 2], "rejected_ids": [3]}
    out = tmp_path / "p.jsonl"
    assert main(["pairs", "--samples", _write(tmp_path / "stale.jsonl", [stale]), "--output", str(out)]) == 0
    assert not any(key.endswith("_ids") for key in _read(out)[0])
    bad = dict(row, completion_ids=[[1, 2]])
    assert main(["pairs", "--samples", _write(tmp_path / "bad.jsonl", [bad]), "--output", str(out), "--overwrite"]) == 2
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'completion_ids' must hold one list of token ids"):
        read_samples(str(tmp_path / "bad.jsonl"))
    pairs_file = {"prompt": "Q", "chosen": "a", "rejected": "b", "prompt_ids": [1], "chosen_ids": ["x"]}
    with pytest.raises(DataError, match=r"bad-pairs.jsonl:1: field 'chosen_ids' must hold token ids"):
        load_examples(_write(tmp_path / "bad-pairs.jsonl", [pairs_file]))


def test_tiny_loop_trains_on_the_sampled_ids(tmp_path, capsys):
    """sample -> pairs -> train with a tiny random Llama and its byte tokenizer, as `prefopt iterate` chains them.

    A random model emits arbitrary bytes; a byte cut from its UTF-8 character decodes to U+FFFD,
    which re-tokenises to three other bytes, so here too the text would not give the ids back."""
    model = save_tiny_model(tmp_path / "m")
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": f"Q{i}: say something."} for i in range(6)])
    module = tmp_path / "kept_ids_rewards.py"
    module.write_text(
        "from prefopt.rewards import register_reward\n"
        "@register_reward('test_kept_ids_length', replace=True)\n"
        "def length(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"
    )
    samples, pairs = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    reward = ["--reward", "test_kept_ids_length", "--reward-module", str(module)]
    argv = ["sample", "--model", model, "--prompts", prompts, "--num-samples", "3", "--max-new-tokens", "8"]
    assert main(argv + ["--seed", "0", "--output", str(samples), *reward]) == 0
    assert main(["pairs", "--samples", str(samples), "--output", str(pairs)]) == 0
    sampled = {r["prompt"]: r for r in _read(samples)}
    written = _read(pairs)
    for pair in written:
        row = sampled[pair["prompt"]]
        ids_of = {text: [] for text in row["completions"]}
        for text, ids in zip(row["completions"], row["completion_ids"], strict=True):
            ids_of[text].append(ids)
        assert pair["prompt_ids"] == row["prompt_ids"]
        assert pair["chosen_ids"] in ids_of[pair["chosen"]] and pair["rejected_ids"] in ids_of[pair["rejected"]]
    examples, _ = load_examples(str(pairs))
    kept = PreferenceTokenizer(byte_tokenizer(), 64).all(examples, log=None)
    text = PreferenceTokenizer(byte_tokenizer(), 64).all([_text_only(e) for e in examples], log=None)
    assert [(k.chosen_ids, k.rejected_ids) for k in kept] == [(p["chosen_ids"], p["rejected_ids"]) for p in written]
    differ = sum(
        (k.chosen_ids != t.chosen_ids) + (k.rejected_ids != t.rejected_ids) for k, t in zip(kept, text, strict=True)
    )
    assert differ > 0  # seed 0: 9 of the 10 completions (bytes cut from their characters, no EOS)
    capsys.readouterr()
    run = ["train", "--model", model, "--data", str(pairs), "--output-dir", str(tmp_path / "run"), "--loss", "dpo"]
    run += ["--max-steps", "1", "--batch-size", "2", "--dtype", "float32", "--max-length", "64"]
    assert main(run) == 0
    assert f"prefopt: data: {2 * len(written)} completions used their sampled token ids" in capsys.readouterr().out
