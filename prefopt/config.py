"""One TrainConfig: YAML keys == field names == CLI flags (with hyphens). defaults < YAML < flags."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefopt.errors import PrefoptError

REFERENCE_MODES = ("auto", "copy", "adapter", "cached", "none")


class ConfigError(PrefoptError):
    pass


class ConfigValueError(ConfigError):
    """A field's value has the wrong type or is out of range. `build_config` adds where it came from."""

    def __init__(self, key: str, problem: str, where: str | None = None):
        self.key, self.problem = key, problem
        super().__init__(f"{where or key}: {problem}")


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Everything a run needs. Each field is a YAML key and a CLI flag (`learning_rate` -> `--learning-rate`)."""

    # what to optimise
    loss: str = _help("registered loss name (`prefopt losses` lists them)", default="dpo")
    loss_args: dict = _help("loss hyperparameters, e.g. {beta: 0.1}; CLI: --loss-arg NAME=VALUE", default_factory=dict)
    beta: float | None = _help("shortcut for loss_args.beta", default=None)
    loss_module: list = _help("modules or .py files to import first (custom losses)", default_factory=list)
    # model
    model: str = _help("local model folder, or the alias smollm2-135m-instruct", default="smollm2-135m-instruct")
    dtype: str = _help(
        "auto | float32 | bfloat16 | float16: what the weights are kept in (auto: float32, the master weights "
        "of mixed precision; bf16/fp16 weights are leanest and train with Kahan-compensated AdamW)",
        default="auto",
    )
    mixed_precision: str = _help(
        "auto | no | bf16 | fp16: autocast compute over float32 weights (auto: bf16 where the CPU or GPU has "
        "bf16 matmul units: AMX, AVX512-BF16, Ampere+; else none). fp16 needs a GPU",
        default="auto",
    )
    optimizer: str = _help(
        "auto | adamw | adamw_kahan: auto is adamw for float32 weights and adamw_kahan (torch-optimi) for "
        "bf16/fp16 weights, whose small updates plain AdamW rounds away (it warns with the share kept)",
        default="auto",
    )
    lora: bool = _help("train a LoRA adapter instead of all weights", default=False)
    lora_r: int = _help("LoRA rank", default=16)
    lora_alpha: int = _help("LoRA alpha", default=32)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    lora_target_modules: str = _help("'all-linear' or comma-separated module names", default="all-linear")
    load_in_4bit: bool = _help("QLoRA: 4-bit NF4 base with double quantization (needs --lora)", default=False)
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", default=False)
    trust_remote_code: bool = _help("allow model code from the model folder (off: safer)", default=False)
    disable_dropout: bool = _help(
        "turn the model's dropout off (TRL's default): with it on, the policy scores a text differently from "
        "its reference and from itself, and DPO does not start at ln 2. LoRA's own dropout is kept",
        default=True,
    )
    reference: str = _help(
        "auto | copy | adapter | cached | none: how reference log-probs are computed", default="auto"
    )
    reference_model: str | None = _help(
        "the frozen reference's weights (folder, alias, or a run's final/); default: --model, the policy's "
        "starting point. Iterative DPO keeps it at pi_0 while --model moves",
        default=None,
    )
    # data
    data: list = _help(
        "training data: files (.jsonl/.json/.parquet/.csv, save_to_disk folders) or hub dataset ids "
        "(org/name[:split]), each with an optional mixture weight (FILE:0.7); in Python also a datasets.Dataset "
        "or a list of record dicts (docs/data.md)",
        default_factory=list,
    )
    format: str | None = _help(
        "standard | conversational | implicit | unpaired | sharegpt (default: detect)", default=None
    )
    columns: dict = _help(
        "prefopt's field names -> the data's, e.g. {prompt: question, chosen: good}; CLI: --columns "
        "prompt=question,chosen=good",
        default_factory=dict,
    )
    data_config: str | None = _help("the configuration (subset) of hub datasets in --data", default=None)
    data_workers: int | None = _help(
        "processes that tokenize a large dataset (default: the cores); the result is cached", default=None
    )
    eval_data: list = _help("held-out data (as --data); default: eval_fraction of data", default_factory=list)
    eval_fraction: float = _help("fraction of data held out for evaluation when eval_data is empty", default=0.0)
    max_length: int = _help("token budget of prompt + completion", default=512)
    max_prompt_length: int | None = _help("token budget of the prompt (its end is kept)", default=None)
    group_by_length: bool = _help("batch examples of similar length together (less padding)", default=False)
    # online: policy-gradient losses (grpo, rloo, remax, reinforce_pp) sample from prompt-only data each step
    num_generations: int = _help("completions sampled per prompt each step (G; the group of GRPO/RLOO)", default=4)
    max_new_tokens: int = _help("token budget of each sampled completion", default=64)
    overlong_buffer: int | None = _help(
        "DAPO's overlong reward shaping: completions longer than max_new_tokens - N lose up to "
        "overlong_penalty reward, linearly (off: null)",
        default=None,
    )
    overlong_penalty: float = _help(
        "the reward a completion of max_new_tokens tokens loses (with overlong_buffer)", default=1.0
    )
    num_iterations: int = _help(
        "updates per sampled batch (GRPO's mu, PPO's epochs; TRL's name): > 1 makes the ratio and clips real",
        default=1,
    )
    steps_per_generation: int | None = _help(
        "micro-batches one sampled batch is split into (mini-batches; a multiple of grad_accum); "
        "default: grad_accum when num_iterations > 1, else 1",
        default=None,
    )
    dynamic_sampling_rounds: int = _help(
        "DAPO's dynamic sampling: groups whose rewards are all equal are replaced by newly drawn prompts, "
        "up to N extra sampling rounds per batch (0: off; for group-baseline losses: grpo, rloo, gspo, cispo)",
        default=0,
    )
    mask_truncated_completions: bool = _help(
        "DAPO: completions cut at max_new_tokens leave the loss (they still count in their group's advantages)",
        default=False,
    )
    importance_sampling_cap: float | None = _help(
        "truncated importance sampling: weight each token's policy gradient by min(pi_old / pi_sampler, C) "
        "(for a sampler in another precision or engine; off: null)",
        default=None,
    )
    mismatch_threshold: float = _help(
        "warn once when the sampler's and learner's log-probs of the sampled tokens differ by more than "
        "this on average (nats)",
        default=0.05,
    )
    temperature: float = _help("sampling temperature of the completions (> 0)", default=1.0)
    top_p: float = _help("nucleus sampling: keep the smallest set of tokens with this much probability", default=1.0)
    reward: list | None = _help(
        "registered reward(s) that score sampled completions (`prefopt rewards`); several are summed", default=None
    )
    reward_weights: list | None = _help(
        "one weight per reward (default 1 each); the reward is their weighted sum", default=None
    )
    reward_args: dict = _help("reward arguments, e.g. {path: DIR}; CLI: --reward-arg NAME=VALUE", default_factory=dict)
    reward_module: list = _help("modules or .py files to import first (custom rewards)", default_factory=list)
    # optimisation
    output_dir: str = _help("where the run writes config, metrics, checkpoints and final/", default="runs/prefopt")
    max_steps: int = _help("optimizer steps; -1: run num_epochs", default=-1)
    num_epochs: float = _help("passes over the data when max_steps is -1", default=1.0)
    batch_size: int = _help("examples (pairs) per device per micro-batch", default=4)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    learning_rate: float = _help("peak learning rate", default=1e-6)
    value_learning_rate: float | None = _help(
        "peak learning rate of PPO's value head (a fresh Linear); default: learning_rate", default=None
    )
    lr_scheduler: str = _help("transformers scheduler name (linear, cosine, constant, ...)", default="linear")
    warmup_ratio: float = _help("fraction of steps of linear warm-up", default=0.0)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    max_grad_norm: float = _help("gradient clipping norm", default=1.0)
    seed: int = _help("random seed (data order, init of adapters)", default=42)
    chunk_size: int = _help("tokens per log-prob chunk (bounds logits memory)", default=1024)
    share_prefix: bool = _help(
        "paired data: one forward over [prompt; chosen; rejected] (prompt computed once)", default=True
    )
    pack: bool = _help(
        "with share_prefix: short pairs share one sequence (fewer padding positions, never longer rows)",
        default=True,
    )
    lean_activations: bool = _help(
        "RMSNorm and SwiGLU keep fewer tensors for backward (same results, less memory)", default=True
    )
    trim_memory: bool = _help(
        "CPU: give freed memory back to the system every few layers (glibc malloc_trim; lower peak RSS)",
        default=True,
    )
    # run management
    logging_steps: int = _help("log every N optimizer steps", default=10)
    eval_steps: int | None = _help("evaluate every N steps (default: only at the end)", default=None)
    save_steps: int = _help("checkpoint every N steps", default=500)
    save_total_limit: int | None = _help("keep at most N checkpoints", default=None)
    resume: bool = _help("continue the run in output_dir from its newest checkpoint", default=False)
    overwrite: bool = _help("replace a previous run's outputs in output_dir", default=False)
    skip_nonfinite: int = _help("skip up to N batches whose loss or gradient is NaN/inf (default: stop)", default=0)
    report_to: list = _help("logging integrations (tensorboard, wandb, ...)", default_factory=list)

    def __post_init__(self) -> None:
        _check_values(self)  # every field against its type hint and range, before anything reads them
        if self.beta is not None:
            self.loss_args = {**self.loss_args, "beta": self.beta}
            self.beta = None
        steps = self.steps_per_generation
        if steps is not None and steps > 1 and steps % self.grad_accum:
            raise ConfigError(
                f"steps_per_generation ({steps}) must be a multiple of grad_accum ({self.grad_accum}): "
                "each pass over a sampled batch starts an optimizer step"
            )
        if self.load_in_4bit and not self.lora:
            raise ConfigError("load_in_4bit trains a LoRA adapter on a frozen 4-bit base: add --lora")

    def to_dict(self) -> dict:
        """The settings as plain values; data given as Python objects is named, not copied."""
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("data", "eval_data"):
            plain[name] = [_describe_entry(entry) for entry in plain[name]]
        return copy.deepcopy(plain)

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)

DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
OPTIMIZERS = ("auto", "adamw", "adamw_kahan")

# Ranges, checked after the type: (test, what the value must be).
_RANGES: dict[str, tuple] = {
    "learning_rate": (lambda v: v > 0, "> 0"),
    "value_learning_rate": (lambda v: v > 0, "> 0"),
    "warmup_ratio": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "max_grad_norm": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "num_epochs": (lambda v: v > 0, "> 0"),
    "max_steps": (lambda v: v == -1 or v >= 1, "-1 (run num_epochs) or >= 1"),
    "eval_fraction": (lambda v: 0 <= v < 1, ">= 0 and < 1"),
    "lora_dropout": (lambda v: 0 <= v < 1, ">= 0 and < 1"),
    "seed": (lambda v: 0 <= v < 2**32, "between 0 and 2**32 - 1"),
    "skip_nonfinite": (lambda v: v >= 0, ">= 0"),
    "temperature": (lambda v: v > 0, "> 0 (policy-gradient losses learn from differences between samples)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "overlong_penalty": (lambda v: v >= 0, ">= 0"),
    "importance_sampling_cap": (lambda v: v >= 1, ">= 1 (weights above it are cut to it)"),
    "mismatch_threshold": (lambda v: v > 0, "> 0"),
    "dynamic_sampling_rounds": (lambda v: v >= 0, ">= 0"),
    **{
        name: (lambda v: v >= 1, ">= 1")
        for name in (
            "batch_size",
            "grad_accum",
            "max_length",
            "max_prompt_length",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "save_total_limit",
            "chunk_size",
            "lora_r",
            "lora_alpha",
            "num_generations",
            "max_new_tokens",
            "overlong_buffer",
            "num_iterations",
            "steps_per_generation",
            "data_workers",
        )
    },
}


def _schedulers() -> tuple[str, ...]:
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


def _formats() -> tuple[str, ...]:
    from prefopt.data.formats import FORMATS

    return FORMATS


# Fields whose value is one of a few names: the names, or a function giving them (imported only when needed).
_CHOICES: dict[str, Any] = {
    "reference": REFERENCE_MODES,
    "dtype": DTYPES,
    "mixed_precision": MIXED_PRECISION,
    "optimizer": OPTIMIZERS,
    "format": _formats,
    "lr_scheduler": _schedulers,
}


def _coerce(hint, value) -> Any:
    """`value` as a `hint` (bool, int, float, str, list or dict; optional when the hint allows None).

    Raises ValueError with what was expected. Ints pass for floats, but a bool is not a number.
    A float may be written as a string ("1e-6"): YAML 1.1 reads `1e-6` without a dot as text.
    """
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    or_null = " or null" if optional else ""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false{or_null}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected an integer{or_null}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
            number = float(value)
        else:
            raise ValueError(f"expected a number{or_null}")
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number{or_null}")
        return number
    if hint is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise ValueError(f"expected a string{or_null}")
    if hint is _DATA:
        return _coerce_data(value)
    if hint is _NUMBERS:
        return _coerce_numbers(value)
    if hint is list:
        items = [value] if isinstance(value, (str, os.PathLike)) else value
        if isinstance(items, (list, tuple)) and all(isinstance(i, (str, os.PathLike)) for i in items):
            return [os.fspath(i) for i in items]
        raise ValueError("expected a list of strings (or one string)")
    if hint is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ValueError("expected a mapping of NAME: VALUE")
    return value


def _describe_entry(entry):
    """A data entry as config.yaml can hold it: Python objects become a line that names them."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):  # a mixture entry: its path may be a Dataset
        return {**entry, "path": _describe_entry(entry["path"])}
    if isinstance(entry, list):
        return f"<in memory: a list of {len(entry)} records>"
    return f"<in memory: a datasets.Dataset of {len(entry)} rows, fingerprint {getattr(entry, '_fingerprint', '?')}>"


_DATA = object()  # the hint of data/eval_data, whose entries may be Python objects too


def _coerce_data(value) -> list:
    """data / eval_data: a list of entries (prefopt.data.sources): paths and hub ids as strings,
    mixture entries as dicts, a datasets.Dataset, or a list of record dicts (kept as one entry)."""
    from prefopt.data.sources import is_dataset, is_mixture_entry

    if isinstance(value, (str, os.PathLike)) or is_dataset(value):
        value = [value]
    if type(value).__name__ == "DatasetDict":
        raise ValueError("a DatasetDict holds several splits: pass one, e.g. data=dd['train']")
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected a file, a list of files, a datasets.Dataset or a list of records")
    if value and all(isinstance(v, dict) for v in value) and not all(is_mixture_entry(v) for v in value):
        return [list(value)]  # records given directly: one source
    entries = []
    for entry in value:
        if isinstance(entry, os.PathLike):
            entry = os.fspath(entry)
        if not (isinstance(entry, (str, list)) or is_dataset(entry) or is_mixture_entry(entry)):
            raise ValueError(
                "expected files, hub dataset ids, mixture entries {path, weight, max_samples}, Datasets or "
                f"a list of records; entry {len(entries)} is a {type(entry).__name__}"
            )
        entries.append(entry)
    return entries


_HINTS["data"] = _HINTS["eval_data"] = _DATA
_NUMBERS = object()  # the hint of reward_weights: a list of finite numbers
_HINTS["reward_weights"] = _NUMBERS


def _coerce_numbers(value) -> list | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    try:
        return [_coerce(float, v) for v in items]
    except ValueError:
        raise ValueError("expected a list of numbers, one per reward") from None


def _check_values(config: TrainConfig) -> None:
    """Check and normalise every field in place; the first problem raises ConfigValueError naming the field."""
    for name, hint in _HINTS.items():
        value = getattr(config, name)
        try:
            value = _coerce(hint, value)
        except ValueError as problem:
            raise ConfigValueError(name, f"{problem}, got {value!r}") from None
        if value is not None and name in _RANGES:
            test, wanted = _RANGES[name]
            if not test(value):
                raise ConfigValueError(name, f"must be {wanted}, got {value!r}")
        if value is not None and name in _CHOICES:
            choices = _CHOICES[name]
            choices = choices() if callable(choices) else choices
            if value not in choices:
                raise ConfigValueError(name, f"must be one of {', '.join(choices)}, got {value!r}")
        setattr(config, name, value)
    weights, rewards = config.reward_weights, config.reward or []
    if weights is not None and len(weights) != len(rewards):  # before any model loads, not at the first step
        raise ConfigValueError(
            "reward_weights", f"{len(rewards)} rewards but {len(weights)} weights: give one weight per reward"
        )


# What TRL's and transformers' configs (and habit) call a setting that prefopt names otherwise:
# their name -> prefopt's field, and a note where the two are not the same thing.
OTHER_NAMES: dict[str, tuple[str, str]] = {
    "per_device_train_batch_size": ("batch_size", ""),
    "train_batch_size": ("batch_size", ""),
    "gradient_accumulation_steps": ("grad_accum", ""),
    "num_train_epochs": ("num_epochs", ""),
    "lr": ("learning_rate", ""),
    "lr_scheduler_type": ("lr_scheduler", ""),
    "optim": ("optimizer", ""),
    "model_name_or_path": ("model", ""),
    "model_name": ("model", ""),
    "dataset_name": ("data", ""),
    "dataset": ("data", ""),
    "train_file": ("data", ""),
    "eval_dataset": ("eval_data", ""),
    "loss_type": ("loss", ""),
    "torch_dtype": ("dtype", ""),
    "bf16": ("mixed_precision", "with the value bf16"),
    "fp16": ("mixed_precision", "with the value fp16"),
    "use_peft": ("lora", ""),
    "lora_target": ("lora_target_modules", ""),
    "kl_coef": ("beta", ""),
    "resume_from_checkpoint": ("resume", ""),
    "warmup_steps": ("warmup_ratio", "a fraction of the steps"),
    "max_completion_length": ("max_new_tokens", "online losses; offline, max_length covers prompt + completion"),
    "num_train_steps": ("max_steps", ""),
}


def other_name_hint(key: str, spell=lambda name: f"'{name}'", candidates=None, n: int = 1) -> str:
    """'; prefopt calls it ...' for a TRL/transformers name, else '; did you mean ...?' (or '')."""
    key = key.replace("-", "_")
    if key in OTHER_NAMES:
        name, note = OTHER_NAMES[key]
        return f"; prefopt calls it {spell(name)}" + (f" ({note})" if note else "")
    close = difflib.get_close_matches(key, list(candidates or FIELDS), n=n)
    return f"; did you mean {' or '.join(spell(c) for c in close)}?" if close else ""


def _check_keys(keys, where: str) -> None:
    for key in keys:
        if key not in FIELDS:
            raise ConfigError(f"{where}: unknown key '{key}'{other_name_hint(key)}")


class YamlValues(dict):
    """The keys of a YAML recipe, remembering their file (so an error can name it)."""

    def __init__(self, values: dict, path: Path):
        super().__init__(values)
        self.path = path


def load_yaml(path: str | Path) -> YamlValues:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    _check_keys(values, str(path))
    return YamlValues(values, path)


# Mappings given on the command line one NAME=VALUE at a time: --loss-arg, --reward-arg.
DICT_FIELDS = ("loss_args", "reward_args")  # repeatable --loss-arg NAME=VALUE


def flag(name: str) -> str:
    """The command-line flag of a field: learning_rate -> --learning-rate."""
    singular = name in DICT_FIELDS or name == "reward_weights"  # repeatable: --loss-arg, --reward-weight
    return "--" + name[:-1].replace("_", "-") if singular else "--" + name.replace("_", "-")


def build_config(yaml_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """defaults < YAML < overrides (CLI flags). loss_args merge key by key.

    A wrong type or an out-of-range value is reported with where it came from: the flag, or the
    YAML file and key (when `yaml_values` came from `load_yaml`).
    """
    merged: dict = dict(yaml_values or {})
    overrides = dict(overrides or {})
    _check_keys(overrides, "option")
    yaml_file = getattr(yaml_values, "path", None)
    parts = [merged.get("loss_args") or {}, overrides.pop("loss_args", None) or {}]
    for part, where in zip(parts, (f"{yaml_file}: loss_args" if yaml_file else "loss_args", "--loss-arg"), strict=True):
        if not isinstance(part, dict):
            raise ConfigValueError("loss_args", f"expected a mapping of NAME: VALUE, got {part!r}", where)
    merged.update(overrides)
    merged["loss_args"] = {**parts[0], **parts[1]}
    try:
        return TrainConfig(**merged)
    except ConfigValueError as error:
        if error.key in overrides:
            where = flag(error.key)
        else:
            where = f"{yaml_file}: {error.key}" if yaml_file else error.key
        raise ConfigValueError(error.key, error.problem, where) from None
    except TypeError as error:
        raise ConfigError(str(error)) from None


def field_type(name: str):
    """The plain type of a field for CLI parsing: bool, int, float, str or list."""
    hint = _HINTS[name]
    if hint is _DATA:
        return list
    if hint is _NUMBERS:
        return float
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint
