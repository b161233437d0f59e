"""`reward_model`: a local sequence-classification model (num_labels=1) scores each completion.

The model reads prompt + completion as prefopt's training does (its own tokenizer; message
prompts through its own chat template; one EOS at the end), so a reward model trained here
with `bradley_terry` sees at scoring time exactly what it saw in training.

Pooling: the score is read at each sequence's last real token, found from the attention mask.
transformers' `...ForSequenceClassification.forward` instead takes the last token that is not
`pad_token_id`; when pad == eos (most causal LMs) that skips the closing EOS, the very token a
reward model trained with EOS-terminated sequences pools at (TRL #937, transformers #35352).
So we run the backbone and apply the score head ourselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prefopt.rewards.registry import RewardError, register_reward


def sequence_ids(tokenizing, prompt, completion: str, max_length: int) -> list[int]:
    """prompt + completion token ids as training builds them, keeping the end (the EOS) if too long."""
    prompt_ids, prompt_text = tokenizing.prompt_ids(prompt)
    ids = prompt_ids + tokenizing.completion_ids(prompt, prompt_text, prompt_ids, completion)
    return ids[-max_length:]


def pad_right(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def last_token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) score at each row's last attended position (right padding; the mask, not pad ids, decides)."""
    last = attention_mask.sum(dim=1) - 1
    rows = torch.arange(len(input_ids), device=input_ids.device)
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = getattr(model, "score", None)
    if isinstance(backbone, torch.nn.Module) and isinstance(head, torch.nn.Linear):
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return head(hidden[rows, last]).float()[:, 0]
    # Another head layout: score one unpadded row at a time with pooling at the very last token.
    pad_id, model.config.pad_token_id = model.config.pad_token_id, None
    try:
        return torch.cat(
            [model(input_ids=input_ids[i : i + 1, : n + 1]).logits.float()[:, 0] for i, n in enumerate(last)]
        )
    finally:
        model.config.pad_token_id = pad_id


class _OneScoreClassifier:
    """AutoModelForSequenceClassification with num_labels=1, for a LoRA reward model's base: the base
    is a causal LM, whose config says nothing of the head the adapter brings (peft's modules_to_save)."""

    @staticmethod
    def from_pretrained(location, **kwargs):
        from transformers import AutoModelForSequenceClassification

        from prefopt.models.loading import expect_new_score_head

        with expect_new_score_head():  # the base has no score head: the adapter's replaces it
            return AutoModelForSequenceClassification.from_pretrained(location, num_labels=1, **kwargs)


def _check_classifier(path: str):
    """The auto class that loads `path` as a reward model, or a RewardError saying what it is instead."""
    from transformers import AutoModelForSequenceClassification

    from prefopt.models.inference import is_adapter, model_config

    if is_adapter(path):  # a LoRA run's final/: adapter + score head over the base model
        task = json.loads((Path(path) / "adapter_config.json").read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise RewardError(
                f"reward_model: {path} is a LoRA adapter for {task or 'an unknown task'}, not a sequence "
                "classifier (SEQ_CLS); give e.g. the final/ of a run with --loss bradley_terry"
            )
        return _OneScoreClassifier
    config = model_config(path)
    architectures = config.architectures or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise RewardError(
            f"reward_model: {path} is not a sequence classifier (architectures: "
            f"{', '.join(architectures) or 'none'}); give a ...ForSequenceClassification folder, "
            "e.g. the final/ of a run with --loss bradley_terry"
        )
    if config.num_labels != 1:
        raise RewardError(f"reward_model: {path} has num_labels={config.num_labels}; a reward model has 1")
    return AutoModelForSequenceClassification


@register_reward("reward_model")
class RewardModel:
    """A local AutoModelForSequenceClassification folder (num_labels=1), or a LoRA reward model's
    adapter folder (task SEQ_CLS, merged into its base): its score at the last token."""

    def __init__(self, path: str, batch_size: int = 8, max_length: int = 1024, dtype: str = "auto"):
        from prefopt.data.tokenize import PreferenceTokenizer
        from prefopt.models.inference import load_for_inference

        self.model, self.tokenizer = load_for_inference(path, _check_classifier(path), dtype)
        self.tokenizing = PreferenceTokenizer(self.tokenizer, max_length)
        self.batch_size, self.max_length = batch_size, max_length
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts, completions, **columns):
        rows = [sequence_ids(self.tokenizing, p, c, self.max_length) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = pad_right(rows[start : start + self.batch_size], self.tokenizer.pad_token_id, self.device)
            scores += last_token_scores(self.model, ids, mask).tolist()
        return scores
