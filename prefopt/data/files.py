"""Read preference files into plain records, each tagged with where it came from.

JSON and JSON Lines (optionally .gz) are parsed here, line by line, so that a bad line
is reported by number; Parquet, CSV and `save_to_disk` folders are read by `datasets`.
Every problem becomes a `DataError` naming the file, the line or row, and the field.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt.errors import PrefoptError


class DataError(PrefoptError):
    """A data file is missing, unreadable or malformed; the message says where."""


@dataclass
class Record:
    """One raw record and its location, e.g. 'data.jsonl:7' or 'pairs.csv: row 3'."""

    fields: dict[str, Any]
    where: str


def _open_text(path: Path):
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except OSError as error:
            raise DataError(f"{path}: not a valid gzip file ({error})") from None
    return raw


def _decode(path: Path, number: int, line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}:{number}: not valid UTF-8 (byte 0x{line[error.start]:02x} at column {error.start + 1})"
        ) from None


def _decode_lines(path: Path, raw: bytes) -> list[str]:
    return [_decode(path, number, line) for number, line in enumerate(raw.split(b"\n"), start=1)]


def _binary_lines(path: Path) -> Iterator[bytes]:
    """The file's lines, read as they are needed (a .gz is decompressed on the way)."""
    if path.suffix != ".gz":
        with open(path, "rb") as handle:
            yield from handle
        return
    try:
        with gzip.open(path, "rb") as handle:
            yield from handle
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: not a valid gzip file ({error})") from None


def _iter_jsonl(path: Path) -> Iterator[Record]:
    for number, raw in enumerate(_binary_lines(path), start=1):
        line = _decode(path, number, raw)
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: invalid JSON: {error.msg} (column {error.colno})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        yield Record(value, f"{path}:{number}")


def _read_json(path: Path) -> Iterator[Record]:
    text = "\n".join(_decode_lines(path, _open_text(path)))
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})") from None
    if isinstance(value, dict):  # {"train": [...]} or {"data": [...]} as some exports write
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records (or JSON Lines)")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(value).__name__}")
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path}: record {index}: expected a JSON object, got {type(item).__name__}")
        yield Record(item, f"{path}: record {index}")


def _read_with_datasets(path: Path) -> Iterator[Record]:
    import datasets

    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                split = "train" if "train" in loaded else next(iter(loaded))
                loaded = loaded[split]
        elif path.suffix == ".parquet":
            loaded = datasets.Dataset.from_parquet(str(path))
        else:
            loaded = datasets.Dataset.from_csv(str(path), keep_default_na=False)
    except Exception as error:  # datasets/pyarrow raise many types; the user needs the file and the reason
        raise DataError(
            f"{path}: cannot read: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    # CSV rows are numbered as a spreadsheet shows them: the header is row 1.
    first = 2 if path.suffix == ".csv" else 1
    for i, row in enumerate(loaded, start=first):
        yield Record(dict(row), f"{path}: row {i}")


_READERS = {".jsonl": _iter_jsonl, ".json": _read_json, ".parquet": _read_with_datasets, ".csv": _read_with_datasets}


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def iter_file_records(path: str | Path) -> Iterator[Record]:
    """The records of one file (or `save_to_disk` folder), in order; JSON Lines is streamed."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise DataError(f"{path}: a folder must be one saved with datasets' save_to_disk")
        reader = _read_with_datasets
    else:
        reader = _READERS.get(_suffix(path))
        if reader is None:
            raise DataError(f"{path}: unsupported file type; use .jsonl, .json, .parquet, .csv (or .gz of JSON)")
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
    found = 0
    for record in reader(path):
        found += 1
        yield record
    if not found:
        raise DataError(f"{path}: the file has no records")


def read_records(paths) -> list[Record]:
    """All records of one or several sources (files, folders, hub ids, Datasets, lists: prefopt.data.sources)."""
    from prefopt.data.sources import iter_source_records, parse_sources

    return [record for source in parse_sources(paths) for record in iter_source_records(source)]
