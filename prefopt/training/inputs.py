"""What a run trains on, decided from the loss's declared needs: the reference mode, the
examples (pairs, singles or prompts, with a held-out split) and their token ids.

`train` calls these before any model is loaded (examples) or right after the tokenizer is
(token ids), so data mistakes are reported in seconds. Both stages are cached on disk
(prefopt.data.cache): a second run, a resume or another process reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefopt.config import ConfigError, TrainConfig
from prefopt.data import DataError
from prefopt.data.cache import build_examples, held_out_positions, mixture_indices, tokenize_table
from prefopt.data.sources import parse_sources
from prefopt.distributed import launched_processes
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


@dataclass
class PreparedData:
    """What a run trains and evaluates on, before tokenization: example tables (offline losses)
    or prompt lists (online ones), and what reading the data found."""

    train: object  # ExampleTable | list[PromptExample]
    eval: object  # ExampleTable | list | None
    report: object  # NormaliseReport | PromptReport
    sources: list = field(default_factory=list)  # SourceCount per source (offline)
    reused: bool = False  # the examples came from the data cache

    def summary(self) -> dict:
        """For summary.json: the data's sources and how many examples each gave."""
        if not self.sources:
            return {}
        return {
            "sources": [{k: v for k, v in vars(c).items() if v is not None} for c in self.sources],
            "train_examples": len(self.train),
            "eval_examples": len(self.eval) if self.eval is not None else 0,
        }


def _mixed(table) -> bool:
    return any(c.weight is not None or c.max_samples for c in table.sources)


def prepare_examples(config: TrainConfig, spec: LossSpec) -> PreparedData:
    """Read, validate and cache the examples (prefopt.data.cache), apply the mixture and the split."""
    if spec.needs_rollouts:  # policy-gradient losses sample their own completions of each prompt
        return _prepare_prompts(config, spec)
    train_table = build_examples(parse_sources(config.data, config.data_config), config.format, config.columns)
    for warning in train_table.report.warnings:
        print(f"prefopt: data: {warning}")
    if _mixed(train_table):
        train_table = train_table.select(mixture_indices(train_table, config.seed))
        print("prefopt: data: mixture " + ", ".join(_mixture_part(c) for c in train_table.sources))
    eval_table = None
    if config.eval_data:
        eval_table = build_examples(parse_sources(config.eval_data, config.data_config), config.format, config.columns)
    elif config.eval_fraction > 0:
        kept, held = held_out_positions(len(train_table), config.eval_fraction, config.seed)
        train_table, eval_table = train_table.select(kept), train_table.select(held)
    if spec.paired and train_table.unpaired:
        named = ", ".join(c.label for c in train_table.sources)
        raise PrefoptError(f"loss '{spec.name}' needs paired data (prompt/chosen/rejected); {named} is unpaired")
    if eval_table is not None and eval_table.unpaired != train_table.unpaired:
        raise PrefoptError("eval_data and data must both be paired or both be unpaired")
    return PreparedData(train_table, eval_table, train_table.report, train_table.sources, train_table.reused)


def _mixture_part(count) -> str:
    share = f" (weight {count.weight:g})" if count.weight is not None else ""
    cap = f" (max {count.max_samples})" if count.max_samples else ""
    return f"{count.label}: {count.used} of {count.kept}{share}{cap}"


def _prepare_prompts(config: TrainConfig, spec: LossSpec):
    from prefopt.data.formats import load_prompts
    from prefopt.online.reuse import check_enough_prompts, reuse_plan

    if config.eval_data or config.eval_fraction:
        raise ConfigError(
            f"loss '{spec.name}' trains on sampled completions; held-out evaluation during training is not "
            "implemented for it: score the final model with `prefopt eval --prompts FILE --reward NAME`"
        )
    if not config.reward:
        raise ConfigError(
            f"loss '{spec.name}' samples completions and needs a reward to score them: pass --reward NAME"
        )
    prompts, report = load_prompts(config.data, config.format, config.columns)
    plan = reuse_plan(config.num_iterations, config.steps_per_generation, config.grad_accum)
    if plan.active:  # an error now, not after the model has loaded
        check_enough_prompts(len(prompts), config.batch_size * plan.steps_per_generation * launched_processes())
    return PreparedData(prompts, None, report)


def tokenize_examples(examples, tokenizer, config: TrainConfig, spec: LossSpec, label: str, offset: int = 0):
    """Token ids of a split: a TokenizedItems view of the cached table (offline losses; indices
    from `offset`, which keys the reference cache) or a list of tokenized prompts (online)."""
    if spec.needs_rollouts:
        from prefopt.online.step import tokenize_prompts

        return tokenize_prompts(examples, tokenizer, config.max_prompt_length)
    as_singles = not spec.paired and not examples.unpaired  # paired data for an unpaired loss (KTO)
    tokenized = tokenize_table(
        examples, tokenizer, config.max_length, config.max_prompt_length, as_singles, config.data_workers
    )
    rep = tokenized.report
    if not rep.kept:
        raise DataError(
            f"no example fits max_length={config.max_length}"
            + (f" with max_prompt_length={config.max_prompt_length}" if config.max_prompt_length else "")
            + f": all {rep.examples} were dropped; raise max_length or set max_prompt_length"
        )
    note = rep.ids_note()
    if note:
        print(f"prefopt: data: {note}")
    if rep.truncated or rep.dropped_too_long:
        print(
            f"prefopt: {label}: {rep.truncated} truncated, {rep.dropped_too_long} dropped (max_length {config.max_length})"
        )
    print(
        f"prefopt: {label}: {len(tokenized.items)} examples, token ids "
        + ("read from" if tokenized.reused else "cached in")
        + f" {tokenized.path}"
    )
    kl_max_length = config.max_length if spec.needs_kl_pairs else None
    return tokenized.items.with_view(offset=offset, kl_max_length=kl_max_length)
