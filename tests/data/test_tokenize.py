"""Completion masks token by token, EOS exactly once, truncation and dropping, collation."""

from pathlib import Path

import pytest
from helpers import byte_tokenizer

from prefopt.data import (
    DataError,
    PairExample,
    PreferenceCollator,
    PreferenceTokenizer,
    SingleExample,
    attach_mismatched_completions,
    load_examples,
    pairs_to_singles,
)

SAMPLES = Path(__file__).resolve().parents[2] / "data_samples"


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_standard_pair_with_byte_tokenizer_token_by_token():
    tok = byte_tokenizer()
    t = PreferenceTokenizer(tok, max_length=64)
    pair = t.pair(PairExample("Q: 1+1?", " 2", " three", "x:1"), 0)
    assert pair.prompt_ids == ids(tok, "Q: 1+1?")
    assert pair.chosen_ids == ids(tok, " 2") + [tok.eos_token_id]
    assert pair.rejected_ids == ids(tok, " three") + [tok.eos_token_id]


def test_conversational_pair_with_byte_tokenizer():
    tok = byte_tokenizer()
    prompt = [{"role": "user", "content": "hi"}]
    pair = PreferenceTokenizer(tok, 128).pair(
        PairExample(prompt, [{"role": "assistant", "content": "hello"}], [{"role": "assistant", "content": "no"}], "x"),
        0,
    )
    assert tok.decode(pair.prompt_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # this tokenizer's EOS is <|endoftext|>, not the template's <|im_end|>: appended once
    assert tok.decode(pair.chosen_ids) == "hello<|im_end|>\n<|endoftext|>"
    assert pair.chosen_ids.count(tok.eos_token_id) == 1


def test_smollm2_conversational_masks_and_single_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    (example, *_), _ = load_examples(SAMPLES / "conversational.jsonl")
    t = PreferenceTokenizer(tok, 512)
    pair = t.pair(example, 0)
    full = tok.apply_chat_template(example.prompt + example.chosen, tokenize=False)
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    prompt_text = tok.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
    assert pair.prompt_ids == tok(prompt_text, add_special_tokens=False)["input_ids"]
    # prompt + chosen is exactly the template's rendering, minus the newline after <|im_end|> (EOS)
    assert pair.prompt_ids + pair.chosen_ids == full_ids[: len(pair.prompt_ids) + len(pair.chosen_ids)]
    assert tok.decode(pair.chosen_ids) == example.chosen[0]["content"] + "<|im_end|>"
    assert pair.chosen_ids[-1] == tok.eos_token_id and pair.chosen_ids.count(tok.eos_token_id) == 1
    assert t.report.template_not_prefix == 0 and t.report.boundary_retokenized == 0


def test_smollm2_text_completion_already_ending_in_eos_gets_no_second_one(smollm2_tokenizer):
    tok = smollm2_tokenizer
    pair = PreferenceTokenizer(tok, 64).pair(PairExample("2+2?", " 4<|im_end|>", " 5", "x"), 0)
    assert tok.decode(pair.chosen_ids) == " 4<|im_end|>"
    assert pair.chosen_ids.count(tok.eos_token_id) == 1
    assert tok.decode(pair.rejected_ids) == " 5<|im_end|>"


def test_merge_across_the_boundary_keeps_the_mask_exact(smollm2_tokenizer):
    tok = smollm2_tokenizer
    t = PreferenceTokenizer(tok, 64)
    pair = t.pair(PairExample("Hello", "world", "there", "x"), 0)
    assert t.report.boundary_retokenized >= 1
    assert pair.prompt_ids == tok("Hello")["input_ids"]
    assert tok.decode(pair.chosen_ids) == "world<|im_end|>"


def test_truncation_keeps_prompt_end_and_cuts_completions():
    tok = byte_tokenizer()
    t = PreferenceTokenizer(tok, max_length=10, max_prompt_length=4)
    pair = t.pair(PairExample("abcdefgh", "0123456789", "xy", "x"), 0)
    assert tok.decode(pair.prompt_ids) == "efgh"
    assert tok.decode(pair.chosen_ids) == "012345"  # 10 - 4 tokens, EOS cut off
    assert pair.rejected_ids == ids(tok, "xy") + [tok.eos_token_id]
    assert t.report.truncated == 1


def test_examples_that_cannot_fit_are_dropped_and_none_left_is_an_error():
    tok = byte_tokenizer()
    t = PreferenceTokenizer(tok, max_length=5)
    kept = t.all([PairExample("abcdefgh", "a", "b", "x"), PairExample("ab", "c", "d", "y")])
    assert len(kept) == 1 and kept[0].where == "y" and kept[0].index == 0 and t.report.dropped_too_long == 1
    with pytest.raises(DataError, match="no example fits max_length=5: all 1 were dropped"):
        PreferenceTokenizer(tok, max_length=5).all([PairExample("abcdefgh", "a", "b", "x")])


def test_paired_collation_rows_and_prediction_map():
    tok = byte_tokenizer()
    t = PreferenceTokenizer(tok, 64)
    pairs = [t.pair(PairExample("ab", "c", "dd", "x"), 0), t.pair(PairExample("abc", "eee", "f", "y"), 1)]
    batch = PreferenceCollator(pad_id=tok.pad_token_id)(pairs)
    assert batch.input_ids.shape == (4, 7) and batch.num_rows == 4
    assert batch.chosen_rows.tolist() == [0, 1] and batch.rejected_rows.tolist() == [2, 3]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0]  # "ab" | "c" EOS | pad
    # row 0 = "ab" + "c" EOS: "c" is predicted from position 1 ("b"), EOS from position 2
    row0 = batch.predict_row == 0
    assert batch.predict_from[row0].tolist() == [1, 2]
    assert batch.predict_token[row0].tolist() == tok("c", add_special_tokens=False)["input_ids"] + [0]
    # row 3 = "abc" + "f" EOS, flat index 3 * 7 + position
    assert batch.predict_from[batch.predict_row == 3].tolist() == [3 * 7 + 2, 3 * 7 + 3]
    assert batch.num_tokens == 4 + 7 + 5 + 5


def test_shared_prefix_layout_mask_positions_and_predictions():
    tok = byte_tokenizer()
    pair = PreferenceTokenizer(tok, 64).pair(PairExample("ab", "c", "dd", "x"), 0)  # p=2, c=2 (c EOS), r=3
    batch = PreferenceCollator(pad_id=tok.pad_token_id, share_prefix=True)([pair])
    assert batch.input_ids.shape == (1, 7) and batch.num_rows == 2
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3, 4]  # the rejected branch restarts after the prompt
    mask = batch.attention_mask[0, 0].int().tolist()
    assert mask[3] == [1, 1, 1, 1, 0, 0, 0]  # chosen EOS sees prompt + chosen
    assert mask[5] == [1, 1, 0, 0, 1, 1, 0]  # rejected 2nd "d" sees prompt + rejected, not chosen
    # both first completion tokens are predicted from the prompt's last position
    assert batch.predict_from.tolist() == [1, 2, 1, 4, 5]
    assert batch.predict_row.tolist() == [0, 0, 1, 1, 1]
    assert batch.num_tokens == 7


def test_shared_prefix_layout_packs_short_pairs_into_one_sequence():
    """Spans 11, 5 and 5 (prompt + chosen + EOS + rejected + EOS) in a width of 11: first-fit decreasing
    puts the 11 alone and the two 5s together; each pair sees only itself."""
    tok = byte_tokenizer()
    t = PreferenceTokenizer(tok, 64)
    pairs = [
        t.pair(PairExample("abcdef", "c", "dd", "x"), 0),
        t.pair(PairExample("e", "f", "g", "y"), 1),
        t.pair(PairExample("h", "i", "j", "z"), 2),
    ]
    batch = PreferenceCollator(pad_id=tok.pad_token_id, share_prefix=True)(pairs)
    unpacked = PreferenceCollator(pad_id=tok.pad_token_id, share_prefix=True, pack=False)(pairs)
    assert batch.input_ids.shape == (2, 11) and unpacked.input_ids.shape == (3, 11)
    assert batch.num_tokens == unpacked.num_tokens == 21 and batch.num_rows == 6
    assert batch.position_ids[1].tolist() == [0, 1, 2, 1, 2, 0, 1, 2, 1, 2, 0]
    mask = batch.attention_mask[1, 0].int().tolist()
    assert mask[5] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]  # the second pair's prompt does not see the first pair
    assert mask[8] == [0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0]  # its rejected "j" sees its prompt "h", not "i"
    assert mask[10] == [0] * 10 + [1]  # padding attends to itself only
    # pair 2 ("h", "i", "j") starts at flat index 11 + 5 = 16; its completions are logical rows 2 and 5
    assert batch.predict_from.tolist()[-4:] == [16, 17, 16, 19]
    assert batch.predict_row.tolist()[-4:] == [2, 2, 5, 5]
    assert batch.predict_token.tolist() == unpacked.predict_token.tolist()


def _three_singles_with_kl_pairs():
    tok = byte_tokenizer()
    t = PreferenceTokenizer(tok, 64)
    singles = [
        t.single(SingleExample("p1", "aa", True, "x"), 0),
        t.single(SingleExample("p2", "b", False, "y"), 1),
        t.single(SingleExample("p3", "ccc", True, "z"), 2),
    ]
    attach_mismatched_completions(singles, max_length=64)  # n = 3: example i gets completion i + 1 (mod 3)
    return tok, singles


def test_unpaired_collation_with_mismatched_kl_pairs():
    tok, singles = _three_singles_with_kl_pairs()
    batch = PreferenceCollator(pad_id=tok.pad_token_id, with_kl_pairs=True)(singles)
    assert batch.chosen_rows.tolist() == [0, 2] and batch.rejected_rows.tolist() == [1]
    assert batch.kl_rows.tolist() == [3, 4, 5] and not batch.paired
    row = batch.input_ids[3][batch.attention_mask[3].bool()].tolist()
    assert tok.decode(row) == "p1b<|endoftext|>"  # prompt 1 with completion 2
    assert tok.decode(batch.predict_token[batch.predict_row == 5].tolist()) == "aa<|endoftext|>"  # p3 + c1
    assert batch.example_indices == [0, 1, 2]


def test_unpaired_kl_pairs_share_the_prompt_in_the_shared_layout():
    """[prompt; completion; mismatched completion] per example: same logical rows and tokens as the plain layout."""
    tok, singles = _three_singles_with_kl_pairs()
    plain = PreferenceCollator(pad_id=tok.pad_token_id, with_kl_pairs=True)(singles)
    shared = PreferenceCollator(pad_id=tok.pad_token_id, with_kl_pairs=True, share_prefix=True, pack=False)(singles)
    assert shared.input_ids.shape[0] == 3 and plain.input_ids.shape[0] == 6
    assert tok.decode(shared.input_ids[0, :7].tolist()) == "p1aa<|endoftext|>b<|endoftext|>"  # then padding
    assert shared.position_ids[0, :7].tolist() == [0, 1, 2, 3, 4, 2, 3]  # the KL branch restarts after the prompt
    for name in ("chosen_rows", "rejected_rows", "kl_rows"):
        assert getattr(shared, name).tolist() == getattr(plain, name).tolist(), name
    assert not shared.paired
    for row in range(6):  # every logical row predicts the same tokens in both layouts
        assert (
            shared.predict_token[shared.predict_row == row].tolist()
            == plain.predict_token[plain.predict_row == row].tolist()
        )
    assert shared.num_tokens == plain.num_tokens - 6  # three prompts of two tokens computed once instead of twice


def test_mismatched_completions_skip_the_other_half_of_a_pair():
    """pairs_to_singles puts a pair's two halves next to each other; the n//2 offset keeps them apart."""
    tok = byte_tokenizer()
    t = PreferenceTokenizer(tok, 64)
    singles = t.all(pairs_to_singles([PairExample(f"p{i}", f"good{i}", f"bad{i}", "x") for i in range(3)]))
    attach_mismatched_completions(singles, max_length=64)
    for single in singles:
        own_pair = [s.completion_ids for s in singles if s.prompt_ids == single.prompt_ids]
        assert single.kl_completion_ids not in own_pair
