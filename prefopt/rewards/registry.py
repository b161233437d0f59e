"""The reward registry: names -> reward functions (DESIGN §6), in the style of the loss registry.

A reward is `f(prompts, completions, **columns) -> list[float | None]`: one score per
completion, None where it cannot score one (such rows are dropped and counted). `prompts` are
strings or message lists, `completions` strings, and each extra column of the prompts file
(e.g. `answer`) arrives as a keyword argument holding one value per completion.

Register a function, or a class whose instances are such functions (for rewards that load a
model once):

    @register_reward("length", description="characters in the completion")
    def length(prompts, completions, **columns):
        return [float(len(c)) for c in completions]

    @register_reward("reward_model")
    class RewardModel:
        def __init__(self, path: str, batch_size: int = 8): ...
        def __call__(self, prompts, completions, **columns): ...

A function's keyword-only parameters with defaults, or a class's constructor parameters, are
the reward's arguments (`--reward-arg NAME=VALUE`); a constructor parameter without a default
is a required argument. `get_reward(name, **arguments)` returns the reward ready to call, with
its result checked: one number or None per completion.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefopt.errors import PrefoptError

REQUIRED = inspect.Parameter.empty  # the default of a required argument


class RewardError(PrefoptError, ValueError):
    """A reward was asked for, configured or returned wrongly; the message says which and how."""


@dataclass(frozen=True)
class RewardSpec:
    name: str
    target: Callable  # a function, or a class whose instances are reward functions
    arguments: Mapping[str, Any]  # name -> default (REQUIRED when there is none)
    columns: tuple[str, ...] = ()  # columns it cannot do without
    description: str = ""

    @property
    def is_class(self) -> bool:
        return inspect.isclass(self.target)

    def describe_arguments(self) -> str:
        parts = [name if default is REQUIRED else f"{name}={default!r}" for name, default in self.arguments.items()]
        return ", ".join(parts) or "-"


_REGISTRY: dict[str, RewardSpec] = {}


def _arguments(target: Callable) -> dict[str, Any]:
    if inspect.isclass(target):
        params = list(inspect.signature(target.__init__).parameters.values())[1:]  # skip self
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {p.name: p.default for p in params if p.kind in kinds}
    params = inspect.signature(target).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}


def register_reward(
    name: str, *, columns: Sequence[str] = (), description: str | None = None, replace: bool = False
) -> Callable:
    """Register a reward function (or class) under `name`; returns it unchanged."""

    def decorator(target: Callable) -> Callable:
        if name in _REGISTRY and not replace:
            raise RewardError(f"a reward named '{name}' is already registered (pass replace=True)")
        doc = inspect.getdoc(target) or ""
        _REGISTRY[name] = RewardSpec(
            name=name,
            target=target,
            arguments=_arguments(target),
            columns=tuple(columns),
            description=description or (doc.splitlines()[0] if doc else ""),
        )
        return target

    return decorator


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward_spec(name: str) -> RewardSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RewardError(f"unknown reward '{name}'; available: {', '.join(available_rewards())}") from None


class Reward:
    """A registered reward, configured and ready: `reward(prompts, completions, **columns)`.

    Checks its inputs (equal lengths, required columns) and its result (one finite number or
    None per completion; NaN and inf count as None: unscorable). `compare(prompts, a, b, **columns)` is there
    when the reward judges two answers at once (the `judge`): the probability that `a` wins.
    """

    def __init__(self, spec: RewardSpec, arguments: Mapping[str, Any] | None = None):
        self.spec = spec
        given = dict(arguments or {})
        unknown = sorted(set(given) - set(spec.arguments))
        if unknown:
            valid = spec.describe_arguments()
            raise RewardError(f"reward '{spec.name}' has no argument {', '.join(map(repr, unknown))}; valid: {valid}")
        missing = [n for n, d in spec.arguments.items() if d is REQUIRED and n not in given]
        if missing:
            example = " ".join(f"--reward-arg {n}=..." for n in missing)
            raise RewardError(f"reward '{spec.name}' needs {', '.join(missing)}: pass {example}")
        self.arguments = given
        if spec.is_class:
            self._fn = spec.target(**given)
        else:
            target = spec.target
            self._fn = lambda prompts, completions, **columns: target(prompts, completions, **columns, **given)
        self.compare = getattr(self._fn, "compare", None)

    @property
    def name(self) -> str:
        return self.spec.name

    def _check_inputs(self, prompts: list, completions: list, columns: dict) -> None:
        if len(prompts) != len(completions):
            raise RewardError(f"reward '{self.name}': {len(prompts)} prompts but {len(completions)} completions")
        for column in self.spec.columns:
            if column not in columns:
                raise RewardError(
                    f"reward '{self.name}' needs the column '{column}' in the prompts file; "
                    f"found: {', '.join(sorted(columns)) or 'no extra columns'}"
                )
        for column, values in columns.items():
            if len(values) != len(completions):
                raise RewardError(
                    f"reward '{self.name}': column '{column}' has {len(values)} values, not {len(prompts)}"
                )

    def __call__(self, prompts: list, completions: list, **columns) -> list[float | None]:
        self._check_inputs(prompts, completions, columns)
        if not completions:
            return []
        if not self.spec.is_class:  # a column named like an argument would clash with it
            columns = {k: v for k, v in columns.items() if k not in self.arguments}
        return check_scores(self.name, self._fn(prompts, completions, **columns), len(completions))


def check_scores(name: str, scores: Any, expected: int) -> list[float | None]:
    """One float or None per completion, or a RewardError saying what came back instead."""
    if hasattr(scores, "tolist"):  # a tensor or an array
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise RewardError(f"reward '{name}' must return a list of numbers, got {type(scores).__name__}")
    if len(scores) != expected:
        raise RewardError(f"reward '{name}' returned {len(scores)} scores for {expected} completions")
    out: list[float | None] = []
    for i, score in enumerate(scores):
        if score is None:
            out.append(None)
            continue
        if not isinstance(score, numbers.Real):  # bools count: True is 1.0
            raise RewardError(f"reward '{name}': score {i} is not a number: {score!r}")
        score = float(score)
        # NaN or inf: that completion is unscorable (dropped and counted), never a NaN loss or a
        # non-JSON number in a samples file; the run goes on
        out.append(score if math.isfinite(score) else None)
    return out


def get_reward(name: str, **arguments: Any) -> Reward:
    """The registered reward `name`, configured with `arguments` (models are loaded here, once)."""
    return Reward(get_reward_spec(name), arguments)
