"""Rewards that check a completion against the prompt's `answer` column."""

from __future__ import annotations

import re

from prefopt.rewards.registry import register_reward

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def normalise_answer(text) -> str:
    """Lower case, inner whitespace collapsed, outer whitespace and trailing . ! dropped: "  Paris. " == "paris"."""
    return " ".join(str(text).split()).lower().rstrip(".!").strip()


@register_reward(
    "exact_match", columns=("answer",), description="1.0 when the completion is the answer (column 'answer'), else 0.0"
)
def exact_match(prompts, completions, *, answer, **columns):
    """1.0 when the completion, normalised, equals the `answer` column, normalised; else 0.0.

    Normalised: lower case, whitespace collapsed, trailing "." or "!" dropped. A row whose
    answer is missing (None) is unscorable (None).
    """
    return [
        None if expected is None else float(normalise_answer(text) == normalise_answer(expected))
        for text, expected in zip(completions, answer, strict=True)
    ]


@register_reward(
    "number_match",
    columns=("answer",),
    description="1.0 when the answer (column 'answer') is among the completion's numbers",
)
def number_match(prompts, completions, *, answer, **columns):
    """1.0 when the numeric `answer` is one of the numbers written in the completion, else 0.0.

    Looser than exact_match: "3 + 5 equals 8." scores 1.0 for answer 8.
    """
    out = []
    for text, expected in zip(completions, answer, strict=True):
        if expected is None:
            out.append(None)
            continue
        numbers = {float(n) for n in _NUMBER.findall(text)}
        try:
            out.append(float(float(str(expected).strip()) in numbers))
        except ValueError:
            out.append(None)  # the answer is not a number
    return out
