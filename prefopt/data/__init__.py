"""The data layer: files -> validated examples -> token ids -> padded batches."""

from prefopt.data.collate import PreferenceCollator, SequenceBatch
from prefopt.data.dataset import load_examples, split_held_out
from prefopt.data.files import DataError, Record, read_records
from prefopt.data.formats import FORMATS, PairExample, SingleExample, detect_format, normalise, pairs_to_singles
from prefopt.data.tokenize import (
    PreferenceTokenizer,
    TokenizedPair,
    TokenizedSingle,
    attach_mismatched_completions,
)

__all__ = [
    "FORMATS",
    "DataError",
    "PairExample",
    "PreferenceCollator",
    "PreferenceTokenizer",
    "Record",
    "SequenceBatch",
    "SingleExample",
    "TokenizedPair",
    "TokenizedSingle",
    "attach_mismatched_completions",
    "detect_format",
    "load_examples",
    "normalise",
    "pairs_to_singles",
    "read_records",
    "split_held_out",
]
