"""The loss registry: names -> pure loss functions plus what each one needs.

A loss is registered with `@register_loss(name, needs_reference=..., ...)` and removed with
`unregister_loss(name)`; `with temporary_losses():` undoes whatever a block registers. Its
hyperparameters are its keyword-only parameters; their defaults are the defaults.
`get_loss(name)` returns a plain function `fn(inputs, **hyperparameters) -> LossOutput`
that validates names, values and shapes first, and carries the declaration as `fn.spec`
so the trainer can compute exactly what the loss needs without knowing its name.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefopt.losses.base import LossError, LossInputs, LossOutput
from prefopt.losses.checks import Check

LossFn = Callable[..., LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """What a loss is and what it needs from the trainer."""

    name: str
    fn: LossFn
    hyperparameters: Mapping[str, Any]  # name -> default
    checks: Mapping[str, Check] = field(default_factory=dict)
    needs_reference: bool = True  # reference_{chosen,rejected}_logps
    needs_token_kl: bool = False  # chosen_kl / rejected_kl (full-vocabulary, per token)
    needs_kl_pairs: bool = False  # policy_kl_logps / reference_kl_logps (mismatched pairs)
    needs_lengths: bool = False  # chosen_lengths / rejected_lengths
    paired: bool = True  # Bc == Br, row i of each side is one pair
    # Policy-gradient losses (DESIGN §6): each step samples completions of prompt-only data and
    # scores them with the reward: token_logps, token_rows, rewards, groups (and, with
    # needs_reference, reference_token_logps).
    needs_rollouts: bool = False
    needs_greedy_baseline: bool = False  # baseline_rewards: one greedy completion per prompt, scored (ReMax)
    needs_value_model: bool = False  # token_values from a critic trained with the policy (PPO)
    # Reward models: the trained model is a sequence classifier (num_labels=1) and the loss gets
    # chosen_scores / rejected_scores, one scalar per sequence, instead of log-probs.
    needs_sequence_scores: bool = False
    description: str = ""

    @property
    def needs(self) -> list[str]:
        """Human-readable list of what the trainer must provide beyond policy logps."""
        flags = {
            "reference": self.needs_reference,
            "token_kl": self.needs_token_kl,
            "kl_pairs": self.needs_kl_pairs,
            "lengths": self.needs_lengths,
            "rollouts": self.needs_rollouts,
            "greedy_baseline": self.needs_greedy_baseline,
            "value_model": self.needs_value_model,
            "sequence_scores": self.needs_sequence_scores,
        }
        return [name for name, wanted in flags.items() if wanted]

    def resolve(self, hyperparameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with `hyperparameters`, after checking names and values."""
        given = dict(hyperparameters or {})
        unknown = sorted(set(given) - set(self.hyperparameters))
        if unknown:
            valid = ", ".join(self.hyperparameters) or "(none)"
            raise LossError(
                f"loss '{self.name}' has no hyperparameter {', '.join(map(repr, unknown))}; valid ones: {valid}"
            )
        resolved = {**self.hyperparameters, **given}
        for name, value in resolved.items():
            check = self.checks.get(name)
            problem = check(value) if check else None
            if problem:
                raise LossError(f"loss '{self.name}': {name} {problem}")
        return resolved


_REGISTRY: dict[str, LossSpec] = {}


def _keyword_defaults(fn: LossFn) -> dict[str, Any]:
    params = inspect.signature(fn).parameters.values()
    missing = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if missing:
        raise TypeError(f"{fn.__name__}: hyperparameters need defaults: {missing}")
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}


def register_loss(
    name: str,
    *,
    needs_reference: bool = True,
    needs_token_kl: bool = False,
    needs_kl_pairs: bool = False,
    needs_lengths: bool = False,
    paired: bool = True,
    needs_rollouts: bool = False,
    needs_greedy_baseline: bool = False,
    needs_value_model: bool = False,
    needs_sequence_scores: bool = False,
    checks: Mapping[str, Check] | None = None,
    description: str | None = None,
    replace: bool = False,
) -> Callable[[LossFn], LossFn]:
    """Register `fn(inputs: LossInputs, *, hyper=default, ...) -> LossOutput` under `name`.

    Returns the function unchanged, so it stays callable and testable directly.
    """

    def decorator(fn: LossFn) -> LossFn:
        if name in _REGISTRY and not replace:
            raise LossError(f"a loss named '{name}' is already registered (pass replace=True)")
        hyperparameters = _keyword_defaults(fn)
        if needs_sequence_scores:  # a sequence classifier has no log-probs to serve these with
            others = {
                "needs_reference": needs_reference,
                "needs_token_kl": needs_token_kl,
                "needs_kl_pairs": needs_kl_pairs,
                "needs_rollouts": needs_rollouts,
                "needs_greedy_baseline": needs_greedy_baseline,
                "needs_value_model": needs_value_model,
            }
            clash = [flag for flag, wanted in others.items() if wanted]
            if clash:
                raise TypeError(
                    f"loss '{name}': needs_sequence_scores (a reward model) cannot be combined with "
                    f"{', '.join(clash)}; pass {', '.join(f'{flag}=False' for flag in clash)}"
                )
        unknown_checks = set(checks or {}) - set(hyperparameters)
        if unknown_checks:
            raise TypeError(f"checks for unknown hyperparameters of '{name}': {unknown_checks}")
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = LossSpec(
            name=name,
            fn=fn,
            hyperparameters=hyperparameters,
            checks=dict(checks or {}),
            needs_reference=needs_reference,
            needs_token_kl=needs_token_kl,
            needs_kl_pairs=needs_kl_pairs,
            needs_lengths=needs_lengths,
            paired=paired,
            needs_rollouts=needs_rollouts,
            needs_greedy_baseline=needs_greedy_baseline,
            needs_value_model=needs_value_model,
            needs_sequence_scores=needs_sequence_scores,
            description=description or (doc.splitlines()[0] if doc else ""),
        )
        return fn

    return decorator


def unregister_loss(name: str) -> LossSpec:
    """Remove a registered loss and return its spec (to register it again, or restore it)."""
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise LossError(f"no loss named '{name}' is registered") from None


@contextlib.contextmanager
def temporary_losses() -> Iterator[None]:
    """Losses registered (or replaced, or unregistered) inside the block are undone when it ends.

    For tests and notebooks that try a loss out: `with temporary_losses(): register_loss(...)(fn)`.
    """
    saved = dict(_REGISTRY)
    try:
        yield
    finally:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def available_losses() -> list[str]:
    return sorted(_REGISTRY)


def get_loss_spec(name: str) -> LossSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LossError(f"unknown loss '{name}'; available: {', '.join(available_losses())}") from None


_REQUIRED_FIELDS = {
    "needs_reference": ("reference_chosen_logps", "reference_rejected_logps"),
    "needs_token_kl": ("chosen_kl", "rejected_kl"),
    "needs_kl_pairs": ("policy_kl_logps", "reference_kl_logps"),
    "needs_lengths": ("chosen_lengths", "rejected_lengths"),
    "needs_rollouts": ("token_logps", "token_rows", "rewards", "groups"),
    "needs_greedy_baseline": ("baseline_rewards",),
    "needs_value_model": ("token_values",),
    "needs_sequence_scores": ("chosen_scores", "rejected_scores"),
}


def _check_inputs(spec: LossSpec, inputs: LossInputs) -> None:
    for flag, names in _REQUIRED_FIELDS.items():
        if getattr(spec, flag):
            missing = [n for n in names if getattr(inputs, n) is None]
            if missing:
                raise LossError(f"loss '{spec.name}' needs {', '.join(missing)}")
    if spec.needs_rollouts and spec.needs_reference and inputs.reference_token_logps is None:
        raise LossError(f"loss '{spec.name}' needs reference_token_logps")
    # Each side's size is set by the policy's log-probs or, for a sequence classifier, its scores.
    sizes = {}
    for side in ("chosen", "rejected"):
        name = f"{side}_scores" if spec.needs_sequence_scores else f"policy_{side}_logps"
        if getattr(inputs, name) is None:
            raise LossError(f"loss '{spec.name}' needs {name}")
        size = sizes[side] = getattr(inputs, name).shape
        for prefix, suffix in (
            ("policy_", "_logps"),
            ("reference_", "_logps"),
            ("", "_lengths"),
            ("", "_kl"),
            ("", "_scores"),
        ):
            other = getattr(inputs, f"{prefix}{side}{suffix}")
            if other is not None and other.shape != size:
                raise LossError(
                    f"loss '{spec.name}': {prefix}{side}{suffix} has shape {tuple(other.shape)}, {name} has {tuple(size)}"
                )
    n_chosen, n_rejected = sizes["chosen"][0], sizes["rejected"][0]
    if spec.paired and n_chosen != n_rejected:
        raise LossError(
            f"loss '{spec.name}' is paired: it needs as many chosen as rejected examples "
            f"(row i of each is one pair), got {n_chosen} chosen and {n_rejected} rejected"
        )
    if n_chosen + n_rejected == 0:
        raise LossError(f"loss '{spec.name}': the batch is empty")


def get_loss(name: str) -> LossFn:
    """The registered loss as a plain function that validates before computing.

    Half-precision inputs are computed in float32; the declaration is at `fn.spec`.
    """
    spec = get_loss_spec(name)

    @functools.wraps(spec.fn)
    def loss_fn(inputs: LossInputs, **hyperparameters: Any) -> LossOutput:
        resolved = spec.resolve(hyperparameters)
        _check_inputs(spec, inputs)
        return spec.fn(inputs.at_least_float32(), **resolved)

    loss_fn.spec = spec  # type: ignore[attr-defined]
    return loss_fn
