"""`prefopt data inspect`: what a data file holds and what training would make of it."""

from __future__ import annotations

from collections import Counter

from prefopt.data.files import read_records
from prefopt.data.formats import PROMPT_FORMAT, SingleExample, detect_format, normalise, normalise_prompts
from prefopt.data.tokenize import PreferenceTokenizer

PERCENTILES = (50, 90, 99, 100)


def _percentile(values: list[int], q: int) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))]  # nearest-rank


def inspect_data(
    paths, load_tokenizer, max_length: int, max_prompt_length: int | None = None, fmt: str | None = None
) -> dict:
    """A JSON-able report: format, counts, token-length percentiles, truncation, balance.

    `load_tokenizer` is called only once the data has been read and validated, so a bad
    file is reported at once, without waiting for a model to load.
    """
    records = read_records(paths)
    if (fmt or detect_format(records[0])) == PROMPT_FORMAT:
        return _inspect_prompts(paths, records, load_tokenizer, max_prompt_length)
    examples, report = normalise(records, fmt)
    tokenizer = load_tokenizer()
    tokenizing = PreferenceTokenizer(tokenizer, max_length, max_prompt_length)
    for index, example in enumerate(examples):
        tokenizing.single(example, index) if isinstance(example, SingleExample) else tokenizing.pair(example, index)
    tok = tokenizing.report
    result = {
        "files": [str(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])],
        "format": report.format,
        "records": report.records,
        "usable": report.kept,
        "identical_pairs": report.identical_pairs,
        "duplicates": report.duplicates,
        "empty_completions": report.empty_completions,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "truncated": tok.truncated,
        "dropped_too_long": tok.dropped_too_long,
        "fit": tok.kept,
        "token_lengths": {
            part: {f"p{q}": _percentile(values, q) for q in PERCENTILES} for part, values in tok.lengths.items()
        },
    }
    if report.format == "unpaired":
        labels = Counter(example.label for example in examples)
        result["labels"] = {"desirable": labels[True], "undesirable": labels[False]}
    return result


def _inspect_prompts(paths, records, load_tokenizer, max_prompt_length: int | None) -> dict:
    """Prompt-only files: counts, extra columns, prompt token lengths (as `prefopt sample` renders them)."""
    examples, report = normalise_prompts(records, PROMPT_FORMAT)
    tokenizing = PreferenceTokenizer(load_tokenizer(), max_length=2)
    lengths = [len(tokenizing.prompt_ids(example.prompt)[0]) for example in examples]
    return {
        "files": [str(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])],
        "format": PROMPT_FORMAT,
        "records": report.records,
        "usable": report.kept,
        "duplicates": report.duplicates,
        "conversational": sum(example.conversational for example in examples),
        "columns": report.columns,
        "max_prompt_length": max_prompt_length,
        "truncated": sum(n > max_prompt_length for n in lengths) if max_prompt_length else 0,
        "token_lengths": {"prompt": {f"p{q}": _percentile(lengths, q) for q in PERCENTILES}},
    }


def _format_prompt_report(result: dict) -> list[str]:
    lines = [
        f"files:            {', '.join(result['files'])}",
        f"format:           {result['format']} (prompt-only: for prefopt sample / iterate)",
        f"records:          {result['records']}",
        f"usable:           {result['usable']}  (dropped: {result['duplicates']} duplicate prompts; "
        f"{result['conversational']} conversational)",
        f"extra columns:    {', '.join(result['columns']) or '(none)'}",
    ]
    if result["max_prompt_length"]:
        lines.append(f"at max_prompt_length={result['max_prompt_length']}: {result['truncated']} truncated")
    return lines


def format_report(result: dict) -> str:
    if result["format"] == PROMPT_FORMAT:
        lines = _format_prompt_report(result)
        lines.append("token lengths:    " + "  ".join(f"p{q:<3}" for q in PERCENTILES).replace("p100", "max "))
        lines.append("  prompt          " + "  ".join(f"{v:<4}" for v in result["token_lengths"]["prompt"].values()))
        return "\n".join(lines)
    lines = [
        f"files:            {', '.join(result['files'])}",
        f"format:           {result['format']}",
        f"records:          {result['records']}",
        f"usable:           {result['usable']}  (dropped: {result['identical_pairs']} identical pairs, "
        f"{result['duplicates']} duplicates, {result['empty_completions']} empty completions)",
    ]
    if "labels" in result:
        labels = result["labels"]
        lines.append(f"labels:           {labels['desirable']} desirable, {labels['undesirable']} undesirable")
    budget = f"max_length={result['max_length']}"
    if result["max_prompt_length"]:
        budget += f", max_prompt_length={result['max_prompt_length']}"
    lines.append(
        f"at {budget}: {result['fit']} fit, {result['truncated']} truncated, "
        f"{result['dropped_too_long']} dropped (prompt too long)"
    )
    lines.append("token lengths:    " + "  ".join(f"p{q:<3}" for q in PERCENTILES).replace("p100", "max "))
    for part, stats in result["token_lengths"].items():
        lines.append(f"  {part:<15} " + "  ".join(f"{v:<4}" for v in stats.values()))
    return "\n".join(lines)
