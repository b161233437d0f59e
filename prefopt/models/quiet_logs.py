"""transformers' output that tells a user nothing to act on, kept out of a run's console: weight
loading bars, and the "missing keys" warning for tied weights on resume."""

from __future__ import annotations

import contextlib
import logging
import re


@contextlib.contextmanager
def quiet_loading_bars():
    """No 'Loading weights' / 'Writing model shards' bars during a run: they tell a user nothing
    to act on. The training bar stays (transformers draws it with tqdm directly, not through
    this switch). The switch is global, so it is put back as it was."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class TiedKeysFilter(logging.Filter):
    """Drops transformers' "missing keys in the checkpoint" warning when every missing key is a
    parameter tied to another one (lm_head.weight with tied embeddings): safetensors stores a tied
    tensor once, and loading the checkpoint restores it through the tie, so nothing is missing."""

    PREFIX = "There were missing keys in the checkpoint model loaded:"

    def __init__(self, model):
        super().__init__()
        by_tensor: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            by_tensor.setdefault(id(param), []).append(name)
        self.tied = {name for names in by_tensor.values() if len(names) > 1 for name in names}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        keys = re.findall(r"'([^']+)'", message[len(self.PREFIX) :])
        return not keys or not all(_strip_wrappers(key) in self.tied or key in self.tied for key in keys)


def _strip_wrappers(key: str) -> str:
    for prefix in ("module.", "_orig_mod.", "base_model.model."):
        key = key.removeprefix(prefix)
    return key


def quiet_tied_weight_warnings(model) -> TiedKeysFilter:
    """Install a TiedKeysFilter for `model` on transformers' trainer logger, replacing an earlier one
    (so runs in one notebook do not pile them up). It keeps parameter names only, not the model."""
    logger = logging.getLogger("transformers.trainer")
    for old in [f for f in logger.filters if isinstance(f, TiedKeysFilter)]:
        logger.removeFilter(old)
    quiet = TiedKeysFilter(model)
    logger.addFilter(quiet)
    return quiet
