"""Validated examples and their token ids, kept on disk as Arrow and read back memory-mapped.

Two stages, each cached under $PREFOPT_CACHE/data (prefopt.paths) and keyed by everything that
changes its result, so a second run, a resume or another process of the same run reads the
cache instead of doing the work again (and any change makes a new entry):

- **examples** (`build_examples`): the sources' records read one at a time, validated and
  de-duplicated (prefopt.data.formats.Normaliser, so a bad record still names its file, line and
  field) and written in batches: memory stays flat whatever the data's size. Keyed by the
  sources' contents (prefopt.data.sources.source_fingerprint), the format and the column mapping.
- **token ids** (`tokenize_table`): a `datasets` map of prefopt.data.tokenize.PreferenceTokenizer
  over the rows one run uses (its mixture and split), `num_proc` processes for a large table.
  Keyed by the examples, those rows, the tokenizer (its vocabulary, merges, normaliser, special
  tokens) and chat template, the token budgets and whether pairs are split into singles (KTO).

Under several processes (torchrun, accelerate launch) every process asks for the same entry; a
file lock lets one build it while the others wait, then they all memory-map it: no N-fold work
or memory. Entries are written to a staging name and renamed, so a killed build leaves none.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefopt.data.files import DataError
from prefopt.data.formats import (
    Normaliser,
    NormaliseReport,
    PairExample,
    SingleExample,
    check_trainable_format,
    detect_format,
)
from prefopt.data.sources import Source, iter_source_records, rename_columns, source_fingerprint
from prefopt.data.tokenize import PreferenceTokenizer, TokenizedPair, TokenizedSingle, TokenizeReport
from prefopt.paths import cache_root

CACHE_VERSION = 1  # bump when a stage's output changes for the same inputs
_BATCH = 2000  # rows per Arrow record batch while writing examples
_SHOW_PROGRESS = 20_000  # rows from which tokenizing shows a progress bar
_ROWS_PER_WORKER = 1000  # below this many rows per process, one process tokenizes (start-up costs more)


def data_cache_dir() -> Path:
    return cache_root() / "data"


@contextlib.contextmanager
def _build_lock(path: Path):
    """Held while one process builds `path`; the others wait here, then find it built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _digest(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


# -- examples -----------------------------------------------------------------------------------


@dataclass
class SourceCount:
    """What one source gave: records read, examples kept, and (after a mixture) used."""

    label: str
    records: int = 0
    kept: int = 0
    used: int | None = None
    weight: float | None = None
    max_samples: int | None = None


@dataclass
class ExampleTable:
    """Validated examples, one Arrow row each (memory-mapped), and what reading them found."""

    dataset: object  # a datasets.Dataset
    key: str
    unpaired: bool
    report: NormaliseReport
    sources: list[SourceCount] = field(default_factory=list)
    reused: bool = False

    def __len__(self) -> int:
        return len(self.dataset)

    def select(self, indices: list[int]) -> ExampleTable:
        """These rows (in this order), keyed by them."""
        picked = self.dataset.select(indices)
        key = _digest(self.key, hashlib.blake2b(_as_bytes(indices), digest_size=16).hexdigest())
        return ExampleTable(picked, key, self.unpaired, self.report, self.sources, self.reused)

    def examples(self) -> list:
        """The rows as PairExample / SingleExample (small tables: evaluation, tests)."""
        return [example_of_row(row, self.unpaired) for row in self.dataset]


def _as_bytes(indices) -> bytes:
    import numpy as np

    return np.asarray(indices, dtype=np.int64).tobytes()


def _schema(unpaired: bool):
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    texts = ["prompt", "completion"] if unpaired else ["prompt", "chosen", "rejected"]
    columns = [(name, pa.string()) for name in texts]
    if unpaired:
        columns.append(("label", pa.bool_()))
    columns += [(f"{name}_ids", ids) for name in texts]
    columns += [("where", pa.string()), ("source", pa.int32())]
    return pa.schema(columns)


def _row_of_example(example, source: int) -> dict:
    """Texts are stored as JSON (a string, or a list of messages) so one column holds either."""
    unpaired = isinstance(example, SingleExample)
    texts = ("prompt", "completion") if unpaired else ("prompt", "chosen", "rejected")
    row = {name: json.dumps(getattr(example, name), ensure_ascii=False) for name in texts}
    for name in texts:
        ids = getattr(example, f"{name}_ids")
        row[f"{name}_ids"] = list(ids) if ids is not None else None
    if unpaired:
        row["label"] = example.label
    row["where"], row["source"] = example.where, source
    return row


def example_of_row(row: dict, unpaired: bool):
    def ids(name):
        value = row.get(f"{name}_ids")
        return tuple(value) if value is not None else None

    if unpaired:
        return SingleExample(
            json.loads(row["prompt"]),
            json.loads(row["completion"]),
            bool(row["label"]),
            row["where"],
            ids("prompt"),
            ids("completion"),
        )
    return PairExample(
        json.loads(row["prompt"]),
        json.loads(row["chosen"]),
        json.loads(row["rejected"]),
        row["where"],
        ids("prompt"),
        ids("chosen"),
        ids("rejected"),
    )


def _write_examples(sources: list[Source], fmt: str | None, columns: dict, path: Path) -> dict:
    """Stream every source's records through one Normaliser into an Arrow file at `path`."""
    import pyarrow as pa

    normaliser, writer, unpaired, counts, rows = None, None, None, [], []
    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        for number, source in enumerate(sources):
            count = SourceCount(source.label, weight=source.weight, max_samples=source.max_samples)
            counts.append(count)
            source_fmt = None
            for record in iter_source_records(source):
                record = rename_columns(record, columns)
                if source_fmt is None:
                    source_fmt = fmt or detect_format(record)
                    check_trainable_format(source_fmt, record.where)
                    normaliser = normaliser or Normaliser(source_fmt)
                    if unpaired is None:
                        unpaired = source_fmt == "unpaired"
                        writer = pa.ipc.new_stream(str(staging), _schema(unpaired))
                    elif unpaired != (source_fmt == "unpaired"):
                        raise DataError(
                            f"{record.where}: this source is {source_fmt} but {sources[0].label} is "
                            f"{normaliser.report.format}: a mixture must be all paired or all unpaired"
                        )
                count.records += 1
                example = normaliser.add(record, source_fmt)
                if example is None:
                    continue
                count.kept += 1
                rows.append(_row_of_example(example, number))
                if len(rows) >= _BATCH:
                    writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=_schema(unpaired)))
                    rows = []
        report = normaliser.finish()
        if rows:
            writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=_schema(unpaired)))
        writer.close()
        writer = None
        os.replace(staging, path)
    finally:
        if writer is not None:
            writer.close()
        staging.unlink(missing_ok=True)
    return {"unpaired": unpaired, "report": asdict(report), "sources": [asdict(c) for c in counts]}


def build_examples(sources: list[Source], fmt: str | None = None, columns: dict | None = None) -> ExampleTable:
    """The sources' validated examples, from the cache when these contents were read before."""
    import datasets

    columns = dict(columns or {})
    fingerprints = [source_fingerprint(source) for source in sources]
    key = _digest("examples", CACHE_VERSION, [f["sha256"] for f in fingerprints], fmt, sorted(columns.items()))
    path = data_cache_dir() / "examples" / f"{key}.arrow"
    info_path = path.with_suffix(".json")
    reused = True
    with _build_lock(path):
        if not (path.exists() and info_path.exists()):
            reused = False
            info = _write_examples(sources, fmt, columns, path)
            info_path.write_text(json.dumps(info))
    info = json.loads(info_path.read_text())
    report = NormaliseReport(**info["report"])
    counts = [SourceCount(**c) for c in info["sources"]]
    for count, source in zip(counts, sources, strict=True):  # weights are not part of the key
        count.weight, count.max_samples = source.weight, source.max_samples
    dataset = datasets.Dataset.from_file(str(path))
    return ExampleTable(dataset, key, info["unpaired"], report, counts, reused)


# -- the rows a run uses: mixture and held-out split -----------------------------------------------


def mixture_indices(table: ExampleTable, seed: int) -> list[int]:
    """Rows of the mixture: each source cut to `max_samples` (its first examples), then, when
    weights are given, a seeded draw from each source in proportion to its weight, as large as
    the sources allow without repeating an example. Rows keep their order. Sets `used`."""
    import numpy as np

    counts = table.sources
    source_of_row = np.asarray(table.dataset.data.column("source").to_numpy())
    rows = [np.flatnonzero(source_of_row == i) for i in range(len(counts))]
    rows = [r[: c.max_samples] if c.max_samples else r for r, c in zip(rows, counts, strict=True)]
    weights = [c.weight for c in counts]
    if any(w is not None for w in weights):
        if any(w is None for w in weights):
            missing = ", ".join(c.label for c in counts if c.weight is None)
            raise DataError(f"{missing}: every source of a weighted mixture needs a weight (a.jsonl:0.7 b.jsonl:0.3)")
        total = sum(weights)
        share = [w / total for w in weights]
        # the largest mixture in which no source is asked for more examples than it has
        size = min(len(r) / s for r, s in zip(rows, share, strict=True))
        generator = random.Random(seed)
        drawn = []
        for r, s in zip(rows, share, strict=True):
            take = min(len(r), round(size * s))
            drawn.append(np.sort(np.asarray(generator.sample(list(r), take), dtype=np.int64)))
        rows = drawn
    for count, r in zip(counts, rows, strict=True):
        count.used = len(r)
    if len(counts) == 1 and counts[0].used == counts[0].kept:
        counts[0].used = None  # one source, all of it: nothing to report
    picked = np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)
    if len(picked) == 0:
        raise DataError("the mixture selects no example (check weights and max_samples)")
    return picked.tolist()


def held_out_positions(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed-seed random split of n examples: (train positions, held-out positions), both in order."""
    if not 0 < fraction < 1:
        raise DataError(f"eval_fraction must be in (0, 1), got {fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(n * fraction)), n - 1)
    if n_eval < 1:
        raise DataError(f"cannot hold out {fraction:.0%} of {n} example(s)")
    held = set(order[:n_eval])
    return [i for i in range(n) if i not in held], [i for i in range(n) if i in held]


# -- token ids ------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids a tokenizer gives: its whole definition (vocabulary, merges,
    normaliser, pre-tokenizer, post-processor with BOS/EOS), added tokens and chat template."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a slow (Python) tokenizer: its vocabulary and settings
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(repr(sorted((k, repr(v)) for k, v in tokenizer.init_kwargs.items())).encode())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps(template, sort_keys=True, default=str).encode())
    digest.update(repr((tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id)).encode())
    return digest.hexdigest()


_COUNTERS = ("truncated", "dropped_too_long", "boundary_retokenized", "template_not_prefix", "from_ids", "ids_mismatch")


def _features(singles: bool):
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    columns = {"prompt_ids": ids}
    if singles:
        columns.update(completion_ids=ids, label=datasets.Value("bool"))
    else:
        columns.update(chosen_ids=ids, rejected_ids=ids)
    columns.update(where=datasets.Value("string"), length=datasets.Value("int32"), fits=datasets.Value("bool"))
    columns.update({f"n_{name}": datasets.Value("int8") for name in _COUNTERS})
    return datasets.Features(columns)


def _tokenize_rows(batch: dict, tokenizer, max_length: int, max_prompt_length, unpaired: bool, as_singles: bool):
    """One `datasets.map` batch: example rows -> token-id rows (two per pair as singles), each
    with its share of the report (n_*) and whether it fits (dropped rows are filtered after)."""
    tokenizing = PreferenceTokenizer(tokenizer, max_length, max_prompt_length)
    singles = unpaired or as_singles
    out: dict[str, list] = {name: [] for name in _features(singles)}
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    for row in rows:
        example = example_of_row(row, unpaired)
        if as_singles:
            parts = [
                SingleExample(
                    example.prompt, example.chosen, True, example.where, example.prompt_ids, example.chosen_ids
                ),
                SingleExample(
                    example.prompt, example.rejected, False, example.where, example.prompt_ids, example.rejected_ids
                ),
            ]
        else:
            parts = [example]
        for part in parts:
            before = {name: getattr(tokenizing.report, name) for name in _COUNTERS}
            if singles:
                item = tokenizing.single(part, 0)
            else:
                item = tokenizing.pair(part, 0)
            for name in _COUNTERS:
                out[f"n_{name}"].append(getattr(tokenizing.report, name) - before[name])
            out["fits"].append(item is not None)
            out["where"].append(part.where)
            out["prompt_ids"].append(item.prompt_ids if item else [])
            out["length"].append(item.length if item else 0)
            if singles:
                out["completion_ids"].append(item.completion_ids if item else [])
                out["label"].append(part.label)
            else:
                out["chosen_ids"].append(item.chosen_ids if item else [])
                out["rejected_ids"].append(item.rejected_ids if item else [])
    return out


def _workers(requested: int | None) -> int:
    if requested:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _progress_bars(shown: bool):
    """datasets' progress bars on or off for a block (a global switch of datasets)."""
    from datasets.utils import logging as datasets_logging

    was = datasets_logging.is_progress_bar_enabled()
    (datasets_logging.enable_progress_bar if shown else datasets_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (datasets_logging.enable_progress_bar if was else datasets_logging.disable_progress_bar)()


def _write_tokens(table: ExampleTable, tokenizer, budget: tuple, as_singles: bool, workers, path: Path) -> dict:
    import pyarrow.compute as pc

    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    num_proc = min(_workers(workers), len(table) // _ROWS_PER_WORKER)
    if num_proc > 1:
        # the tokenizer's own Rust threads would be forked mid-use: one thread per process instead
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with _progress_bars(shown=len(table) >= _SHOW_PROGRESS):
            mapped = table.dataset.map(
                _tokenize_rows,
                batched=True,
                batch_size=500,
                remove_columns=table.dataset.column_names,
                features=_features(table.unpaired or as_singles),
                fn_kwargs={
                    "tokenizer": tokenizer,
                    "max_length": budget[0],
                    "max_prompt_length": budget[1],
                    "unpaired": table.unpaired,
                    "as_singles": as_singles,
                },
                num_proc=num_proc if num_proc > 1 else None,
                cache_file_name=str(staging / "map.arrow"),
                new_fingerprint=path.name,  # ours: datasets need not hash the tokenizer
                load_from_cache_file=False,
                desc="prefopt: tokenizing",
            )
        counts = {name: int(pc.sum(mapped.data.column(f"n_{name}")).as_py() or 0) for name in _COUNTERS}
        counts["examples"] = len(mapped)
        with _progress_bars(shown=False):
            kept = mapped.filter(lambda fits: fits, input_columns="fits", batched=True)
            kept = kept.remove_columns(["fits", *(f"n_{name}" for name in _COUNTERS)])
            counts["kept"] = len(kept)
            final = staging / "final"
            kept.save_to_disk(str(final))
        (final / "prefopt-report.json").write_text(json.dumps(counts))
        del mapped, kept
        os.replace(final, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


@dataclass
class TokenizedTable:
    items: TokenizedItems
    report: TokenizeReport
    path: Path
    reused: bool


def tokenize_table(
    table: ExampleTable,
    tokenizer,
    max_length: int,
    max_prompt_length: int | None = None,
    as_singles: bool = False,
    workers: int | None = None,
) -> TokenizedTable:
    """Token ids of `table`'s rows (pairs, or singles: unpaired data, or pairs split for KTO),
    from the cache when this table was tokenized the same way before."""
    import datasets

    PreferenceTokenizer(tokenizer, max_length, max_prompt_length)  # its argument checks, before any work
    key = _digest(
        "tokens", CACHE_VERSION, table.key, tokenizer_fingerprint(tokenizer), max_length, max_prompt_length, as_singles
    )
    path = data_cache_dir() / "tokens" / key
    reused = True
    with _build_lock(path):
        if not (path / "prefopt-report.json").exists():
            reused = False
            _write_tokens(table, tokenizer, (max_length, max_prompt_length), as_singles, workers, path)
    counts = json.loads((path / "prefopt-report.json").read_text())
    report = TokenizeReport(**counts)
    dataset = datasets.load_from_disk(str(path))
    items = TokenizedItems(dataset, singles=table.unpaired or as_singles, key=key)
    return TokenizedTable(items, report, path, reused)


class TokenizedItems(Sequence):
    """Tokenized examples read from their Arrow table as they are asked for: item i is a
    TokenizedPair / TokenizedSingle with index `offset + i` (the reference cache's key).

    `kl_max_length` set: each single also gets KTO's mismatched completion, that of item
    i + n//2 (mod n), as prefopt.data.tokenize.attach_mismatched_completions gives it."""

    def __init__(self, dataset, singles: bool, key: str, offset: int = 0, kl_max_length: int | None = None):
        self.dataset = dataset
        self.singles = singles
        self.key = key
        self.offset = offset
        self.kl_max_length = kl_max_length

    def with_view(self, offset: int | None = None, kl_max_length: int | None = None) -> TokenizedItems:
        return TokenizedItems(
            self.dataset,
            self.singles,
            self.key,
            self.offset if offset is None else offset,
            self.kl_max_length if kl_max_length is None else kl_max_length,
        )

    @property
    def fingerprint(self) -> str:
        return _digest(self.key, self.offset, self.kl_max_length)

    @property
    def lengths(self) -> list[int]:
        return self.dataset["length"]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        row = self.dataset[i]
        if not self.singles:
            return TokenizedPair(
                row["prompt_ids"], row["chosen_ids"], row["rejected_ids"], self.offset + i, row["where"]
            )
        item = TokenizedSingle(row["prompt_ids"], row["completion_ids"], row["label"], self.offset + i, row["where"])
        if self.kl_max_length is not None:
            n = len(self)
            other = self.dataset[(i + max(1, n // 2)) % n]["completion_ids"]
            item.kl_completion_ids = other[: max(1, self.kl_max_length - len(item.prompt_ids))]
        return item


class ChainedItems(Sequence):
    """Several item sequences read as one (train then eval, for the reference cache)."""

    def __init__(self, *parts):
        self.parts = [p for p in parts if len(p)]

    @property
    def fingerprint(self) -> str | None:
        prints = [getattr(p, "fingerprint", None) for p in self.parts]
        return _digest(*prints) if all(prints) else None

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        for part in self.parts:
            if i < len(part):
                return part[i]
            i -= len(part)
        raise IndexError(i)


def item_lengths(items) -> list[int]:
    """Each item's length (prompt + longest completion), from the table's column when there is one."""
    lengths = getattr(items, "lengths", None)
    return list(lengths) if lengths is not None else [item.length for item in items]
