"""Tokenized examples -> padded tensors for one forward pass.

Every batch is a stack of sequences (prompt + completion, right-padded) with a
completion mask, plus the row indices of the chosen / rejected (desirable /
undesirable) sides. Paired batches put the B chosen rows first, then the B rejected
rows (row i and row B + i are one pair). Unpaired batches keep their order and split
rows by label. When asked, mismatched (x_i, y_{i+1 mod n}) sequences for KTO's
reference point are appended after them, the KL rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prefopt.data.tokenize import TokenizedPair, TokenizedSingle


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T): 1 where the token is a completion token
    chosen_rows: torch.Tensor  # (Bc,)
    rejected_rows: torch.Tensor  # (Br,)
    kl_rows: torch.Tensor  # (Bk,), empty unless mismatched pairs were asked for
    example_indices: list[int] = field(default_factory=list)
    paired: bool = True

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> SequenceBatch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return SequenceBatch(**moved)


def _pad(sequences: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, comp) in enumerate(sequences):
        n, m = len(prompt), len(comp)
        input_ids[row, : n + m] = torch.tensor(prompt + comp, dtype=torch.long)
        attention[row, : n + m] = 1
        completion[row, n : n + m] = 1
    return input_ids, attention, completion


@dataclass
class PreferenceCollator:
    """Collates TokenizedPair or TokenizedSingle lists; picklable for DataLoader workers."""

    pad_id: int
    with_kl_pairs: bool = False

    def __call__(self, examples: list) -> SequenceBatch:
        if isinstance(examples[0], TokenizedPair):
            sequences = [(e.prompt_ids, e.chosen_ids) for e in examples]
            sequences += [(e.prompt_ids, e.rejected_ids) for e in examples]
            n = len(examples)
            chosen, rejected = list(range(n)), list(range(n, 2 * n))
        else:
            assert isinstance(examples[0], TokenizedSingle)
            sequences = [(e.prompt_ids, e.completion_ids) for e in examples]
            chosen = [i for i, e in enumerate(examples) if e.label]
            rejected = [i for i, e in enumerate(examples) if not e.label]
        kl = []
        if self.with_kl_pairs:
            if not isinstance(examples[0], TokenizedSingle) or examples[0].kl_completion_ids is None:
                raise ValueError("mismatched pairs need unpaired examples with attach_mismatched_completions applied")
            kl = list(range(len(sequences), len(sequences) + len(examples)))
            sequences += [(e.prompt_ids, e.kl_completion_ids) for e in examples]
        input_ids, attention, completion = _pad(sequences, self.pad_id)
        as_index = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731
        return SequenceBatch(
            input_ids=input_ids,
            attention_mask=attention,
            completion_mask=completion,
            chosen_rows=as_index(chosen),
            rejected_rows=as_index(rejected),
            kl_rows=as_index(kl),
            example_indices=[e.index for e in examples],
            paired=isinstance(examples[0], TokenizedPair),
        )
