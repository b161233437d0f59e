"""What a run trains on, decided from the loss's declared needs: the reference mode, the
examples (pairs, singles or prompts, with a held-out split) and their token ids.

`train` calls these before any model is loaded (examples) or right after the tokenizer is
(token ids), so data mistakes are reported in seconds.
"""

from __future__ import annotations

from prefopt.config import ConfigError, TrainConfig
from prefopt.data import (
    PreferenceTokenizer,
    SingleExample,
    attach_mismatched_completions,
    load_examples,
    pairs_to_singles,
    split_held_out,
)
from prefopt.errors import PrefoptError
from prefopt.losses import LossSpec


def choose_reference(spec: LossSpec, config: TrainConfig) -> str:
    """The reference mode that serves this loss: from its declared needs and the config."""
    mode = config.reference
    if not spec.needs_reference:
        return "none"
    if mode == "none":
        raise ConfigError(f"loss '{spec.name}' needs a reference model; reference=none cannot serve it")
    if mode == "auto":
        return "adapter" if config.lora and not config.reference_model else "copy"
    if mode == "adapter" and not config.lora:
        raise ConfigError("reference=adapter needs --lora (the reference is the model with its adapter disabled)")
    if mode == "adapter" and config.reference_model:
        raise ConfigError(
            "reference=adapter is the policy's own base with its adapter disabled, not --reference-model; "
            "use reference=copy or reference=cached with --reference-model"
        )
    if mode == "cached" and spec.needs_rollouts:
        raise ConfigError(
            f"reference=cached cannot serve loss '{spec.name}': it scores completions sampled during training, "
            "which no cache holds; use reference=copy or reference=adapter"
        )
    if mode == "cached" and spec.needs_token_kl:
        raise ConfigError(
            f"reference=cached cannot serve loss '{spec.name}': it needs the token-level KL over the full "
            "vocabulary at every step, which needs the reference's distributions, not cached log-probs; "
            "use reference=copy or reference=adapter"
        )
    return mode


def prepare_examples(config: TrainConfig, spec: LossSpec):
    if spec.needs_rollouts:  # policy-gradient losses sample their own completions of each prompt
        return _prepare_prompts(config, spec)
    train_examples, report = load_examples(config.data, config.format)
    for warning in report.warnings:
        print(f"prefopt: data: {warning}")
    eval_examples = []
    if config.eval_data:
        eval_examples, _ = load_examples(config.eval_data, config.format)
    elif config.eval_fraction > 0:
        train_examples, eval_examples = split_held_out(train_examples, config.eval_fraction, config.seed)
    unpaired = isinstance(train_examples[0], SingleExample)
    if spec.paired and unpaired:
        raise PrefoptError(
            f"loss '{spec.name}' needs paired data (prompt/chosen/rejected); {', '.join(config.data)} is unpaired"
        )
    if not spec.paired and not unpaired:
        train_examples, eval_examples = pairs_to_singles(train_examples), pairs_to_singles(eval_examples)
    return train_examples, eval_examples, report


def _prepare_prompts(config: TrainConfig, spec: LossSpec):
    from prefopt.data.formats import load_prompts

    if config.eval_data or config.eval_fraction:
        raise ConfigError(
            f"loss '{spec.name}' trains on sampled completions; held-out evaluation during training is not "
            "implemented for it: score the final model with `prefopt eval --prompts FILE --reward NAME`"
        )
    if not config.reward:
        raise ConfigError(
            f"loss '{spec.name}' samples completions and needs a reward to score them: pass --reward NAME"
        )
    prompts, report = load_prompts(config.data, config.format)
    return prompts, [], report


def tokenize_examples(examples: list, tokenizer, config: TrainConfig, spec: LossSpec, label: str) -> list:
    if spec.needs_rollouts:
        from prefopt.online.step import tokenize_prompts

        return tokenize_prompts(examples, tokenizer, config.max_prompt_length)
    tokenizing = PreferenceTokenizer(tokenizer, config.max_length, config.max_prompt_length)
    items = tokenizing.all(examples)
    rep = tokenizing.report
    if rep.truncated or rep.dropped_too_long:
        print(
            f"prefopt: {label}: {rep.truncated} truncated, {rep.dropped_too_long} dropped (max_length {config.max_length})"
        )
    if spec.needs_kl_pairs:
        attach_mismatched_completions(items, config.max_length)
    return items
