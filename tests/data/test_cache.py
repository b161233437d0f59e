"""The data cache (prefopt.data.cache): the same ids as tokenizing in memory, read back on a second
run without tokenizing, a new entry for any change, one build under concurrent processes."""

import json
import threading
from pathlib import Path

import pytest
from helpers import byte_tokenizer

import prefopt.data.cache as cache
from prefopt.data import DataError, PreferenceTokenizer, attach_mismatched_completions, load_examples, pairs_to_singles
from prefopt.data.cache import build_examples, held_out_positions, mixture_indices, tokenize_table
from prefopt.data.sources import parse_sources

SAMPLES = Path(__file__).resolve().parents[2] / "data_samples"


def _table(*paths, **kwargs):
    return build_examples(parse_sources([str(p) for p in paths]), **kwargs)


def _fields(item):
    return {k: v for k, v in vars(item).items()}


def test_cached_pairs_equal_tokenizing_in_memory():
    """Every field of every item (ids, index, where) is what PreferenceTokenizer.all gives today,
    truncation included (max_length 24 cuts most of standard.jsonl's pairs)."""
    tok = byte_tokenizer()
    expected = PreferenceTokenizer(tok, 24).all(load_examples(SAMPLES / "standard.jsonl")[0], log=None)
    tokenized = tokenize_table(_table(SAMPLES / "standard.jsonl"), tok, 24)
    assert [_fields(i) for i in tokenized.items] == [_fields(i) for i in expected]
    in_memory = PreferenceTokenizer(tok, 24)
    in_memory.all(load_examples(SAMPLES / "standard.jsonl")[0], log=None)
    assert (tokenized.report.truncated, tokenized.report.kept) == (in_memory.report.truncated, in_memory.report.kept)
    assert tokenized.report.truncated > 10


def test_pairs_as_singles_with_kl_completions_equal_the_list_path():
    """KTO on paired data: two singles per pair (chosen True, then rejected False) and each one's
    mismatched completion i + n//2, as pairs_to_singles + attach_mismatched_completions give them."""
    tok = byte_tokenizer()
    expected = PreferenceTokenizer(tok, 40).all(
        pairs_to_singles(load_examples(SAMPLES / "standard.jsonl")[0]), log=None
    )
    attach_mismatched_completions(expected, 40)
    items = tokenize_table(_table(SAMPLES / "standard.jsonl"), tok, 40, as_singles=True).items.with_view(
        kl_max_length=40
    )
    assert len(items) == len(expected) == 96  # 2 pairs' prompts leave no room at 40 tokens
    assert [_fields(i) for i in items] == [_fields(i) for i in expected]


def test_second_run_reads_both_caches_without_reading_or_tokenizing(monkeypatch):
    tok = byte_tokenizer()
    first = tokenize_table(_table(SAMPLES / "unpaired.jsonl"), tok, 64)
    assert not first.reused

    def refuse(*args, **kwargs):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(cache, "_write_examples", refuse)
    monkeypatch.setattr(cache, "_write_tokens", refuse)
    table = _table(SAMPLES / "unpaired.jsonl")
    second = tokenize_table(table, tok, 64)
    assert table.reused and second.reused and second.path == first.path
    assert [_fields(i) for i in second.items] == [_fields(i) for i in first.items]


def test_a_change_of_tokenizer_budget_or_contents_makes_a_new_entry(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text((SAMPLES / "standard.jsonl").read_text())
    tok = byte_tokenizer()
    base = tokenize_table(_table(data), tok, 64)
    other_template = byte_tokenizer()
    other_template.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    changed = {
        "tokenizer": tokenize_table(_table(data), other_template, 64),
        "max_length": tokenize_table(_table(data), tok, 65),
        "max_prompt_length": tokenize_table(_table(data), tok, 64, max_prompt_length=8),
    }
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[:-1]) + "\n")  # one record less: same name, other contents
    changed["contents"] = tokenize_table(_table(data), tok, 64)
    for what, result in changed.items():
        assert not result.reused and result.path != base.path, what
    assert len(changed["contents"].items) == len(base.items) - 1
    assert tokenize_table(_table(data), tok, 64).reused


def test_parallel_tokenization_gives_the_same_table(monkeypatch):
    """num_proc > 1 (forced on small data) keeps every row and its order."""
    tok = byte_tokenizer()
    one = tokenize_table(_table(SAMPLES / "standard.jsonl"), tok, 48, workers=1)
    monkeypatch.setattr(cache, "_ROWS_PER_WORKER", 10)
    monkeypatch.setattr(cache, "data_cache_dir", lambda: Path(str(one.path).split("/data/")[0]) / "data-parallel")
    two = tokenize_table(_table(SAMPLES / "standard.jsonl"), tok, 48, workers=2)
    assert not two.reused and two.path != one.path
    assert [_fields(i) for i in two.items] == [_fields(i) for i in one.items]


def test_concurrent_builders_build_once(monkeypatch):
    """Processes of one run ask at the same time: the lock lets one build, the other reads it."""
    built = []
    real = cache._write_examples

    def counting(*args):
        built.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(cache, "_write_examples", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(_table(SAMPLES / "standard.jsonl"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1 and sorted(r.reused for r in results) == [False, True, True]
    assert len({r.key for r in results}) == 1


def test_a_bad_record_is_named_and_nothing_is_cached(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'chosen' must be a string, got int"):
        _table(bad)
    assert not list((cache.data_cache_dir() / "examples").glob("*.arrow"))  # no half entry left


def test_duplicates_and_identical_pairs_are_still_counted(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "q", "chosen": "x", "rejected": "x"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = _table(path)
    assert (len(table), table.report.duplicates, table.report.identical_pairs) == (1, 2, 1)
    assert table.report.warnings == [
        "dropped 1 pairs whose chosen and rejected are identical",
        "dropped 2 duplicate records",
    ]


def _numbered(path: Path, n: int, tag: str) -> str:
    path.write_text(
        "".join(json.dumps({"prompt": f"{tag}{i}", "chosen": "y", "rejected": "n"}) + "\n" for i in range(n))
    )
    return str(path)


def test_mixture_weights_and_caps(tmp_path):
    """a: 10 examples, b: 30. Weights 0.5/0.5: the largest mixture without repeats has
    min(10/0.5, 30/0.5) = 20 examples, 10 from each. a capped at 4 (its first 4) with weights
    1:3: size min(4/0.25, 30/0.75) = 16, so 4 from a and 12 from b."""
    a, b = _numbered(tmp_path / "a.jsonl", 10, "a"), _numbered(tmp_path / "b.jsonl", 30, "b")
    table = build_examples(parse_sources([f"{a}:0.5", f"{b}:0.5"]))
    rows = mixture_indices(table, seed=1)
    assert [c.used for c in table.sources] == [10, 10] and len(rows) == 20
    assert rows == sorted(rows) and rows[:10] == list(range(10))
    assert mixture_indices(table, seed=1) == rows and mixture_indices(table, seed=2) != rows  # seeded
    capped = build_examples(parse_sources([{"path": a, "weight": 1, "max_samples": 4}, {"path": b, "weight": 3}]))
    rows = mixture_indices(capped, seed=1)
    assert [c.used for c in capped.sources] == [4, 12] and rows[:4] == [0, 1, 2, 3]
    with pytest.raises(DataError, match="every source of a weighted mixture needs a weight"):
        mixture_indices(build_examples(parse_sources([f"{a}:0.5", b])), seed=1)


def test_a_mixture_of_paired_and_unpaired_is_refused(tmp_path):
    with pytest.raises(DataError, match="a mixture must be all paired or all unpaired"):
        _table(SAMPLES / "standard.jsonl", SAMPLES / "unpaired.jsonl")


def test_held_out_positions_match_split_held_out():
    from prefopt.data import split_held_out

    examples = load_examples(SAMPLES / "standard.jsonl")[0]
    train, held = split_held_out(examples, 0.2, seed=3)
    kept, out = held_out_positions(len(examples), 0.2, seed=3)
    assert [examples[i] for i in kept] == train and [examples[i] for i in out] == held
