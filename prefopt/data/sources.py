"""Where data comes from: files, hub datasets and Python objects, alone or mixed with weights.

A data entry (`--data`, YAML `data:`, `TrainConfig.data`) is one of:

  data/pairs.jsonl          a file (.jsonl/.json/.parquet/.csv, .gz of JSON) or a save_to_disk folder
  org/name, org/name:test   a hub dataset id, loaded by `datasets.load_dataset` (split: train by
                            default; its config: `--data-config`). It works offline from the local
                            Hugging Face cache
  ENTRY:0.7                 either of those with a mixture weight (docs/data.md#mixtures)
  {path: ENTRY, weight: 0.7, max_samples: 1000}   the YAML/Python form of one mixture entry

and in Python also a `datasets.Dataset` (a `DatasetDict` gives its split: `dd["train"]`) or a list
of record dicts. Each source reads into `Record`s tagged with where they came from ("file:7",
"org/name:train: row 12", "data[0]: row 3"), so a bad record is named however it was given.

A source's fingerprint is a digest of its contents (files), the datasets fingerprint of its Arrow
table (hub, Dataset), or of its rows (a list): it keys the data cache and --resume's check.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.data.files import DataError, Record, iter_file_records

MIXTURE_KEYS = {"path", "weight", "max_samples", "split", "config"}
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Source:
    """One place data comes from, and its share of a mixture."""

    label: str  # for messages and the summary
    kind: str  # "file" | "hub" | "rows"
    target: Any  # a Path, a hub id, a datasets.Dataset or a list of dicts
    split: str | None = None
    config: str | None = None
    weight: float | None = None  # share of the mixture (normalised over the sources that give one)
    max_samples: int | None = None  # at most this many examples, the first ones (as TRL and LLaMA-Factory)
    loaded: Any = field(default=None, repr=False)  # a hub dataset once loaded


def is_mixture_entry(value) -> bool:
    """A dict naming a source ({path: ..., weight: ...}) rather than a record."""
    return isinstance(value, dict) and "path" in value and set(value) <= MIXTURE_KEYS


def is_dataset(value) -> bool:
    """A datasets.Dataset (checked by name: prefopt.data is imported without datasets)."""
    return any(cls.__name__ == "Dataset" and cls.__module__.startswith("datasets") for cls in type(value).__mro__)


def _split_weight(text: str) -> tuple[str, float | None]:
    """'a.jsonl:0.7' -> ('a.jsonl', 0.7); a name without a numeric tail is returned whole."""
    head, sep, tail = text.rpartition(":")
    if sep and head and re.fullmatch(r"\d+(\.\d*)?|\.\d+", tail):
        return head, float(tail)
    return text, None


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") != 1 or text.lower().endswith(_FILE_SUFFIXES)


def _source_of_text(text: str, weight, max_samples, split, config, default_config) -> Source:
    if text.startswith("<in memory"):  # what config.yaml records for data given as a Python object
        raise DataError(f"{text}: this run's data was a Python object; pass it again (train(TrainConfig(data=...)))")
    name, inline_weight = _split_weight(text) if not Path(text).exists() else (text, None)
    weight = weight if weight is not None else inline_weight
    if Path(name).exists():
        return Source(name, "file", Path(name), weight=weight, max_samples=max_samples)
    hub, _, hub_split = name.partition(":")
    if not _looks_like_path(hub) and _HUB_ID.fullmatch(hub):
        split = split or hub_split or "train"
        return Source(f"{hub}:{split}", "hub", hub, split, config or default_config, weight, max_samples)
    raise DataError(f"{name}: no such file")


def parse_sources(entries, config_name: str | None = None) -> list[Source]:
    """Data entries (see the module docstring) as Sources; a bad entry raises DataError."""
    if isinstance(entries, (str, Path)) or is_dataset(entries):
        entries = [entries]
    if not entries:
        raise DataError("no data file given")
    if isinstance(entries, list) and all(isinstance(e, dict) for e in entries):
        if not all(is_mixture_entry(e) for e in entries):  # a list of records, not of sources
            return [Source("data", "rows", entries)]
    sources = []
    for position, entry in enumerate(entries):
        label = f"data[{position}]" if len(entries) > 1 else "data"
        if isinstance(entry, (str, Path)):
            sources.append(_source_of_text(str(entry), None, None, None, None, config_name))
        elif is_dataset(entry):
            sources.append(Source(label, "hub", entry))
        elif isinstance(entry, list):
            if not all(isinstance(row, dict) for row in entry):
                raise DataError(f"{label}: a list of records must hold dicts, one per record")
            sources.append(Source(label, "rows", entry))
        elif is_mixture_entry(entry):
            sources.append(_mixture_source(entry, label, config_name))
        elif isinstance(entry, dict) and "path" in entry:
            unknown = ", ".join(sorted(set(entry) - MIXTURE_KEYS))
            raise DataError(
                f"{label}: unknown key(s) {unknown}; a mixture entry takes {', '.join(sorted(MIXTURE_KEYS))}"
            )
        else:
            kind = type(entry).__name__
            hint = " (a DatasetDict: pass one split, e.g. data=dd['train'])" if kind == "DatasetDict" else ""
            raise DataError(
                f"{label}: expected a file, a hub dataset id, a Dataset or a list of records, got {kind}{hint}"
            )
    return sources


def _mixture_source(entry: dict, label: str, config_name: str | None) -> Source:
    weight, cap = entry.get("weight"), entry.get("max_samples")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0):
        raise DataError(f"{label}: weight must be a number > 0, got {weight!r}")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise DataError(f"{label}: max_samples must be an integer >= 1, got {cap!r}")
    path = entry["path"]
    if is_dataset(path):
        return Source(label, "hub", path, weight=weight, max_samples=cap)
    return _source_of_text(str(path), weight, cap, entry.get("split"), entry.get("config"), config_name)


# -- reading ------------------------------------------------------------------------------------


def _load_hub(source: Source):
    import datasets

    if not isinstance(source.target, str):
        return source.target
    if source.loaded is not None:
        return source.loaded
    try:
        source.loaded = datasets.load_dataset(source.target, source.config, split=source.split)
        return source.loaded
    except Exception as error:  # hub, network and cache problems come as many types: name the source and why
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        offline = datasets.config.HF_HUB_OFFLINE or "offline" in text.lower() or "connect" in text.lower()
        if offline:
            raise DataError(
                f"{source.label}: not in the local Hugging Face datasets cache, and the hub cannot be reached "
                f"(offline); download it once where there is a network, or pass a file ({text})"
            ) from None
        raise DataError(f"{source.label}: cannot load the hub dataset: {text}") from None


def iter_source_records(source: Source) -> Iterator[Record]:
    """The source's records, in order, one at a time (a file is streamed, not read whole)."""
    if source.kind == "file":
        yield from iter_file_records(source.target)
        return
    rows = source.target if source.kind == "rows" else _load_hub(source)
    if len(rows) == 0:
        raise DataError(f"{source.label}: no records")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{source.label}: row {number}: expected a dict, got {type(row).__name__}")
        yield Record(dict(row), f"{source.label}: row {number}")


def rename_columns(record: Record, columns: dict[str, str]) -> Record:
    """`columns` maps prefopt's field names to the source's (prompt=question): the record with them renamed."""
    if not columns:
        return record
    fields = dict(record.fields)
    for ours, theirs in columns.items():
        if theirs not in fields:
            found = ", ".join(sorted(record.fields)) or "no fields"
            raise DataError(f"{record.where}: no column '{theirs}' (--columns {ours}={theirs}); found {found}")
        fields[ours] = fields.pop(theirs)
    return Record(fields, record.where)


# -- fingerprints ---------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _folder_digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for member in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{member.relative_to(path).as_posix()}\0{_file_digest(member)}\0".encode())
        size += member.stat().st_size
    return digest.hexdigest(), size


_DIGESTS: dict[tuple, dict] = {}  # (path, size, mtime): the digest, so one process hashes a file once


def source_fingerprint(source: Source) -> dict:
    """{"path", "bytes", "sha256"}: what the source holds; the same contents give the same digest."""
    if source.kind == "file":
        path = source.target
        stat = path.stat()
        memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in _DIGESTS:
            if path.is_dir():
                digest, size = _folder_digest(path)
            else:
                digest, size = _file_digest(path), stat.st_size
            _DIGESTS[memo] = {"bytes": size, "sha256": digest}
        return {"path": source.label, **_DIGESTS[memo]}
    if source.kind == "rows":
        digest = hashlib.sha256()
        for row in source.target:
            digest.update(json.dumps(row, sort_keys=True, default=repr).encode())
            digest.update(b"\n")
        return {"path": source.label, "bytes": None, "sha256": digest.hexdigest()}
    if isinstance(source.target, str):
        table = _load_hub(source)
        return {"path": source.label, "bytes": None, "sha256": f"datasets:{table._fingerprint}"}
    # A Dataset object: datasets' own fingerprint names its contents and the transforms that made it.
    return {"path": source.label, "bytes": None, "sha256": f"datasets:{source.target._fingerprint}"}
