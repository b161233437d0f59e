"""Reference log-probs: a frozen copy, the policy with its adapter disabled, or a disk cache.

Each provider returns, for one batch, the reference's summed completion log-prob per row
and, when the loss needs token-level KL, the reference's hidden states at the completion
positions with its output head. The trainer picks the provider from the loss's declared
needs and the config (`auto` = cheapest correct one), never from the loss's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prefopt.config import ConfigError
from prefopt.data.collate import SequenceBatch
from prefopt.models.logps import completion_states, completion_token_logps, output_head, score_model

CACHE_VERSION = "1"


class ModelReference:
    """Reference computed online by a model: a frozen copy, or the policy with adapters off."""

    def __init__(self, model=None, disable_adapter: bool = False, chunk_size: int = 1024, use_logits: bool = False):
        self.model = model
        self.disable_adapter = disable_adapter
        self.chunk_size = chunk_size
        self.use_logits = use_logits
        # Set under mixed precision, when the frozen weights were cast to it: every forward runs under
        # this autocast (a bf16 weight cannot meet an fp32 input outside one).
        self.compute_dtype: torch.dtype | None = None

    def prepare(self, trainer) -> None:
        """Put the frozen copy where the policy trains (DESIGN §7): under DeepSpeed its own
        inference engine (ZeRO-3: sharded like the policy), else this process's device. A 4-bit
        copy was placed when it loaded (bitsandbytes' layers cannot move)."""
        if self.model is None:
            return
        if trainer.is_deepspeed_enabled:
            from prefopt.training.sharding import deepspeed_inference_engine

            self.model = deepspeed_inference_engine(self.model, trainer.accelerator)
        elif not getattr(self.model, "is_loaded_in_4bit", False):
            self.model.to(trainer.args.device)

    @contextlib.contextmanager
    def _model(self, policy):
        """The reference model, in eval mode (no dropout), adapter off where that is the reference."""
        policy = getattr(policy, "module", policy)  # DDP: no gradients here, so the bare model will do
        model = policy if self.disable_adapter else self.model
        was_training = model.training
        model.eval()
        adapter_off = policy.disable_adapter() if self.disable_adapter else contextlib.nullcontext()
        autocast = contextlib.nullcontext()
        if self.compute_dtype is not None:
            autocast = torch.autocast(next(model.parameters()).device.type, dtype=self.compute_dtype)
        try:
            with adapter_off, autocast:
                yield model
        finally:
            model.train(was_training)

    @torch.no_grad()
    def __call__(self, policy, batch: SequenceBatch, keep_states: bool):
        with self._model(policy) as model:
            (logps, _, _), states, head = score_model(model, batch, self.use_logits, self.chunk_size)
        return logps, (states if keep_states else None), head

    @torch.no_grad()
    def token_logps(self, policy, batch: SequenceBatch, temperature: float = 1.0) -> torch.Tensor:
        """The reference's log-prob of each completion token (K,): policy-gradient losses' per-token KL,
        at the sampling temperature as the policy's (prefopt.models.logps.completion_token_logps)."""
        with self._model(policy) as model:
            states = completion_states(model, batch, self.use_logits)
            head = torch.nn.Identity() if self.use_logits else output_head(model)
            return completion_token_logps(head, states, self.chunk_size, temperature)


def _row_keys(batch: SequenceBatch) -> list[tuple[int, str]]:
    """(example index, slot) of every row, following the collator's layout."""
    keys: list = [None] * batch.num_rows
    n = len(batch.example_indices)
    if batch.paired:
        for j, example in enumerate(batch.example_indices):
            keys[j], keys[n + j] = (example, "chosen"), (example, "rejected")
    else:
        for j, example in enumerate(batch.example_indices):
            keys[j] = (example, "completion")
    for j, row in enumerate(batch.kl_rows.tolist()):
        keys[row] = (batch.example_indices[j], "kl")
    return keys


class CachedReference:
    """Reference log-probs computed once before training and stored on disk.

    The file name is a hash of the reference weights, the tokenized data and the layout,
    so a later run with the same model and data reuses it, and any change makes a new one.
    """

    def __init__(self, values: dict[str, torch.Tensor], path: Path, reused: bool):
        self.values = values
        self.path = path
        self.reused = reused

    def __call__(self, policy, batch: SequenceBatch, keep_states: bool):
        if keep_states:
            raise ConfigError("the cached reference has no token distributions (needed for token-level KL)")
        rows = [self.values[slot][example] for example, slot in _row_keys(batch)]
        return torch.stack(rows).to(batch.input_ids.device), None, None

    @staticmethod
    def fingerprint(model, examples: list, extra: str) -> str:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"prefopt-reference-cache:{CACHE_VERSION}:{extra}".encode())
        for name, tensor in sorted(model.state_dict().items()):
            if "lora_" in name:  # a fresh adapter is a no-op (B = 0): the reference is the base
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        known = getattr(examples, "fingerprint", None)  # a cached table names its contents
        if known:
            digest.update(f"items:{known}".encode())
        else:
            for example in examples:
                digest.update(repr(sorted(vars(example).items())).encode())
        return digest.hexdigest()

    @classmethod
    def build(cls, model, examples: list, collator, cache_dir: Path, extra: str, batch_size: int, device):
        """Load the cache for (model, examples) or compute it with `model` (no gradients) and save it."""
        key = cls.fingerprint(model, examples, extra)
        path = Path(cache_dir) / f"{key}.safetensors"
        if path.exists():
            return cls(load_file(str(path)), path, reused=True)
        online = ModelReference(model)
        slots: dict[str, torch.Tensor] = {}
        for start in range(0, len(examples), batch_size):
            batch = collator(examples[start : start + batch_size]).to(device)
            logps, _, _ = online(model, batch, keep_states=False)
            for (example, slot), value in zip(_row_keys(batch), logps.cpu(), strict=True):
                slots.setdefault(slot, torch.full((len(examples),), float("nan")))[example] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".tmp{os.getpid()}")
        save_file(slots, str(staging))
        os.replace(staging, path)  # atomic: a killed run never leaves a half-written cache
        return cls(slots, path, reused=False)
