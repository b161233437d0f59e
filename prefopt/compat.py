"""Every use of a private (underscore) transformers API, in one place, each with the reason.

transformers moves its private methods between releases (5.x renamed several). Keeping them
here means an upgrade that breaks one breaks this file only, and each use says why a public
API does not do. The rest of prefopt calls the named functions and methods below.
"""

from __future__ import annotations

import contextlib
import os

import torch
from transformers import Trainer

# `trainer_pt_utils` is not in transformers' public API listing, but LengthGroupedSampler has been
# there since 4.x and is what `--group-by-length` needs (a sampler over our own length field).
from transformers.trainer_pt_utils import LengthGroupedSampler  # noqa: F401  (re-exported)


def attention_implementation(model) -> str:
    """The model's attention backend ('sdpa', 'eager', ...). Why private: transformers exposes the
    choice only as `config._attn_implementation`; we need it to pick the 4-D mask's dtype."""
    while getattr(model, "config", None) is None and hasattr(model, "module"):  # DDP, a DeepSpeed engine
        model = model.module
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "sdpa"


# transformers' own switch (integrations/sdpa_attention.py, read at every attention call).
SDPA_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def grouped_query_attention_in_sdpa(device_type: str):
    """On a CPU, let SDPA take grouped-query attention's few key/value heads as they are.

    transformers repeats each key/value head for its group of query heads (`repeat_kv`, a copy) before
    SDPA whenever there is an attention mask, since CUDA's kernels would fall back to the slow math
    one with both a mask and `enable_gqa`; prefix sharing always has a mask. The CPU flash kernel
    takes masked GQA directly (bitwise the same output, tests/models/test_equivalence.py), so the
    copies and their place among the activations kept for backward (3x the key/value heads of
    SmolLM2) are saved. Set for the run only, on CPUs only, and put back as it was."""
    if device_type != "cpu" or os.environ.get(SDPA_GQA_ENV) is not None:
        yield
        return
    os.environ[SDPA_GQA_ENV] = "1"
    try:
        yield
    finally:
        os.environ.pop(SDPA_GQA_ENV, None)


def no_split_module_names(model: torch.nn.Module) -> set[str]:
    """Class names of the model's repeated blocks (decoder layers). Why private: transformers lists
    them only in `_no_split_modules` (for device maps); it is the one generic way to find layers."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


class TrainerHooks(Trainer):
    """The private `Trainer` methods prefopt overrides or calls, each routed to a named method.

    Subclasses override the public-named methods (`record_grad_norm`, `write_checkpoint`,
    `train_sampler`, `train_batch_multiple`) and call `prepared(inputs)`; only this class touches underscores.
    """

    def _get_grad_norm(self, model, grad_norm=None):
        # Why: transformers computes the total pre-clip gradient norm here each optimizer step;
        # reading it saves another pass over every gradient.
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.record_grad_norm(norm)
        return norm

    def record_grad_norm(self, norm) -> None:
        pass

    def _save_checkpoint(self, model, trial):
        # Why: the one place transformers writes checkpoint-N (model, optimizer, scheduler, RNG,
        # trainer state); `write_checkpoint` wraps it to make the write atomic.
        self.write_checkpoint(lambda: super(TrainerHooks, self)._save_checkpoint(model, trial))

    def write_checkpoint(self, save) -> None:
        save()

    def _get_train_sampler(self, train_dataset=None):
        # Why: transformers' own length grouping reads lengths from a `datasets.Dataset` column or
        # from input_ids; our items are collated objects with a `length` field. The sampler
        # method is the only hook for grouping by that field.
        return self.train_sampler(train_dataset) or super()._get_train_sampler(train_dataset)

    def train_sampler(self, train_dataset=None):
        return None

    def get_train_dataloader(self):
        # Why: rollout reuse loads a whole generation batch (batch_size x S prompts) per
        # micro-batch, as TRL's GRPOTrainer does; `_get_dataloader` is the one function that builds
        # the loader exactly as transformers does (collator, workers, accelerate's sharding).
        multiple = self.train_batch_multiple()
        if multiple == 1:
            return super().get_train_dataloader()
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * multiple,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def train_batch_multiple(self) -> int:
        return 1

    def prepared(self, inputs: dict) -> dict:
        """Move a collated batch to the device as training does. Why private: `_prepare_inputs` is
        the only function that does exactly what the training loop does to a batch."""
        return self._prepare_inputs(inputs)
