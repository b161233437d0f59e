"""One TrainConfig: YAML keys == field names == CLI flags (with hyphens). defaults < YAML < flags."""

from __future__ import annotations

import dataclasses
import difflib
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
        "auto | float32 | bfloat16 | float16 (auto: bf16 on a GPU that has it, else fp32)", default="auto"
    )
    lora: bool = _help("train a LoRA adapter instead of all weights", default=False)
    lora_r: int = _help("LoRA rank", default=16)
    lora_alpha: int = _help("LoRA alpha", default=32)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    lora_target_modules: str = _help("'all-linear' or comma-separated module names", default="all-linear")
    load_in_4bit: bool = _help("QLoRA: 4-bit NF4 base with double quantization (needs --lora)", default=False)
    gradient_checkpointing: bool = _help("recompute activations in backward to save memory", default=False)
    trust_remote_code: bool = _help("allow model code from the model folder (off: safer)", default=False)
    reference: str = _help(
        "auto | copy | adapter | cached | none: how reference log-probs are computed", default="auto"
    )
    # data
    data: list = _help("training files (.jsonl/.json/.parquet/.csv or save_to_disk folders)", default_factory=list)
    format: str | None = _help("standard | conversational | implicit | unpaired (default: detect)", default=None)
    eval_data: list = _help("held-out files; default: eval_fraction of data", default_factory=list)
    eval_fraction: float = _help("fraction of data held out for evaluation when eval_data is empty", default=0.0)
    max_length: int = _help("token budget of prompt + completion", default=512)
    max_prompt_length: int | None = _help("token budget of the prompt (its end is kept)", default=None)
    group_by_length: bool = _help("batch examples of similar length together (less padding)", default=False)
    # optimisation
    output_dir: str = _help("where the run writes config, metrics, checkpoints and final/", default="runs/prefopt")
    max_steps: int = _help("optimizer steps; -1: run num_epochs", default=-1)
    num_epochs: float = _help("passes over the data when max_steps is -1", default=1.0)
    batch_size: int = _help("examples (pairs) per device per micro-batch", default=4)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    learning_rate: float = _help("peak learning rate", default=1e-6)
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
        if self.beta is not None:
            self.loss_args = {**self.loss_args, "beta": self.beta}
            self.beta = None
        for name in ("data", "eval_data", "loss_module", "report_to"):
            value = getattr(self, name)
            if isinstance(value, (str, Path)):
                setattr(self, name, [str(value)])
        if self.reference not in REFERENCE_MODES:
            raise ConfigError(f"reference must be one of {', '.join(REFERENCE_MODES)}, got '{self.reference}'")
        if self.load_in_4bit and not self.lora:
            raise ConfigError("load_in_4bit trains a LoRA adapter on a frozen 4-bit base: add --lora")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps", "save_steps", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_keys(keys, where: str) -> None:
    for key in keys:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")


def load_yaml(path: str | Path) -> dict:
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
    return values


def build_config(yaml_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """defaults < YAML < overrides (CLI flags). loss_args merge key by key."""
    merged: dict = dict(yaml_values or {})
    overrides = dict(overrides or {})
    _check_keys(overrides, "option")
    loss_args = {**(merged.get("loss_args") or {}), **(overrides.pop("loss_args", None) or {})}
    merged.update(overrides)
    merged["loss_args"] = loss_args
    try:
        return TrainConfig(**merged)
    except TypeError as error:
        raise ConfigError(str(error)) from None


def field_type(name: str):
    """The plain type of a field for CLI parsing: bool, int, float, str or list."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint
