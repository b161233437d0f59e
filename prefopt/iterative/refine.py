"""Refinement pairs: a stronger model corrects and improves sampled answers.

The notes' "FollowComplexInstruction" recipe: a weaker model (the policy) answers, a stronger
one corrects and refines its answers, and training on the corrections beats training on the
strong model's own answers; the (original, correction) pairs serve preference training too.

For each sampled completion (only those scoring below `threshold`, when one is given) the
refiner reads one request built from a template (`REFINE_TEMPLATE`, or the user's own: any
text with `{prompt}` and `{response}`, and `{COLUMN}` for any column of the samples file, e.g.
`{answer}` to correct against a known answer) and answers it greedily. The request is the
refiner's user turn under its chat template; without a template it is plain text followed by
"\\nImproved response:". Each refinement becomes one pair, the refinement chosen and the
original rejected. With a reward both are scored and a pair is kept only when the refinement
scores higher; empty refinements, refinements equal to the original, and those that do not
score higher are dropped and counted. The kept refinements are SFT data as well (best-of-N
records: `completion`, `label: true`).

Token ids: the rejected side is the policy's own sample and keeps its sampled ids
(`rejected_ids`, with `prompt_ids`) exactly as `prefopt pairs` keeps them; the chosen side is
another model's text and is tokenised by training.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from prefopt.errors import PrefoptError
from prefopt.iterative.pairs import OUTPUT_FIELDS, Scored, as_answer, with_ids
from prefopt.rewards.judge import as_text

REFINE_TEMPLATE = (
    "Here is a request and a draft response to it.\n\n"
    "[Request]\n{prompt}\n\n[Draft response]\n{response}\n\n"
    "Correct any mistakes in the draft and improve it. Reply with the improved response only."
)
PLAIN_CUE = "\nImproved response:"  # ends the request for a refiner without a chat template


@dataclass
class RefineReport:
    prompts: int = 0
    completions: int = 0
    duplicates: int = 0  # a prompt's repeated completions are refined once
    empty: int = 0  # blank originals: nothing to refine
    unscorable: int = 0  # originals (with a threshold) or refinements the reward could not score
    good_enough: int = 0  # originals at or above the threshold: not refined
    refined: int = 0  # requests sent to the refiner
    empty_refinements: int = 0
    unchanged: int = 0  # the refiner gave the original back
    not_better: int = 0  # with a reward: the refinement did not score higher than the original
    written: int = 0
    sft_written: int = 0

    def summary(self) -> str:
        dropped = [
            f"{self.empty_refinements} empty",
            f"{self.unchanged} unchanged",
            f"{self.not_better} not better",
            f"{self.unscorable} unscorable",
        ]
        skipped = f"{self.good_enough} at or above the threshold, " if self.good_enough else ""
        return (
            f"{self.written} refinement pairs from {self.prompts} prompts ({self.completions} completions: "
            f"{skipped}{self.empty} empty, {self.duplicates} repeated; {self.refined} refined; "
            f"dropped: {', '.join(dropped)})"
        )

    def why_empty(self) -> str:
        if not self.refined:
            if self.good_enough:
                return f"all {self.good_enough} scored completions reached the threshold: nothing to refine"
            return "there were no non-empty completions to refine"
        return (
            f"of {self.refined} refinements {self.empty_refinements} were empty, {self.unchanged} unchanged, "
            f"{self.not_better} not better and {self.unscorable} unscorable"
        )


def check_template(template: str, columns: set[str]) -> None:
    """A one-line error when the template names a field that no samples record provides."""
    try:
        names = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as error:
        raise PrefoptError(f"refinement template: {error} (write a literal brace as {{{{ or }}}})") from None
    if "response" not in names:
        raise PrefoptError(
            "refinement template: it has no {response} placeholder, so the refiner never sees the answer"
        )
    unknown = sorted(names - {"prompt", "response"} - columns)
    if unknown:
        available = ", ".join(["prompt", "response", *sorted(columns)])
        raise PrefoptError(f"refinement template: no field '{unknown[0]}' in the samples file; available: {available}")


def refinement_request(template: str, sample: Scored, response: str, chat: bool):
    """The refiner's input: one user turn (chat template), or plain text ending with PLAIN_CUE."""
    fields = {name: as_text(value) for name, value in sample.columns.items() if value is not None}
    text = template.format(**{**fields, "prompt": as_text(sample.prompt), "response": response})
    return [{"role": "user", "content": text}] if chat else text + PLAIN_CUE


def _candidates(samples: list[Scored], threshold: float | None, report: RefineReport) -> list[tuple[int, int]]:
    """(sample, completion) indices to refine: each distinct non-empty completion, below the threshold if any."""
    out = []
    for s, sample in enumerate(samples):
        report.prompts += 1
        report.completions += len(sample.completions)
        seen = set()
        for i, text in enumerate(sample.completions):
            if not text.strip():
                report.empty += 1
                continue
            if text in seen:
                report.duplicates += 1
                continue
            seen.add(text)
            if threshold is not None:
                reward = sample.rewards[i]
                if reward is None:
                    report.unscorable += 1
                    continue
                if reward >= threshold:
                    report.good_enough += 1
                    continue
            out.append((s, i))
    return out


def refine(samples: list[Scored], generate, template: str = REFINE_TEMPLATE, threshold=None, reward=None):
    """(pair records, SFT records, report).

    `generate(samples, originals) -> list[str]`: the refiner's answer for each (sample, original
    completion) (see `refiner_generate`). `reward`: a configured reward scoring both sides; without one, the
    originals' rewards from the file (if any) decide the threshold and every changed,
    non-empty refinement is kept.
    """
    if threshold is not None and any(s.rewards is None for s in samples):
        raise PrefoptError("a refinement threshold needs rewards: sample with --reward, or give pairs a --reward")
    check_template(template, {name for s in samples for name in s.columns})
    report = RefineReport()
    rows = _candidates(samples, threshold, report)
    report.refined = len(rows)
    originals = [samples[s].completions[i] for s, i in rows]
    refinements = [text.strip() for text in generate([samples[s] for s, _ in rows], originals)]
    if reward is not None:
        names = sorted({name for s, _ in rows for name in samples[s].columns})
        columns = {name: [samples[s].columns.get(name) for s, _ in rows] for name in names}
        scores = reward([samples[s].prompt for s, _ in rows], refinements, **columns)
    else:
        scores = [None] * len(rows)
    pairs, sft, written_sft = [], [], set()
    for (s, i), text, score in zip(rows, refinements, scores, strict=True):
        sample, original = samples[s], samples[s].completions[i]
        if not text:
            report.empty_refinements += 1
            continue
        if " ".join(text.split()) == " ".join(original.split()):
            report.unchanged += 1
            continue
        own = sample.rewards[i] if sample.rewards is not None else None
        if reward is not None:
            if score is None or own is None:
                report.unscorable += 1
                continue
            if score <= own:
                report.not_better += 1
                continue
        pairs.append(_refinement_pair(sample, i, text, score, own if reward is not None else None))
        if (s, text) not in written_sft:  # two originals of one prompt refined alike: one SFT example
            written_sft.add((s, text))
            sft.append(_refinement_example(sample, text, score))
    report.written, report.sft_written = len(pairs), len(sft)
    return pairs, sft, report


def _refinement_pair(sample: Scored, i: int, refinement: str, chosen_reward, rejected_reward) -> dict:
    record = {k: v for k, v in sample.columns.items() if k not in OUTPUT_FIELDS}
    record.update(
        prompt=sample.prompt,
        chosen=as_answer(sample.prompt, refinement),
        rejected=as_answer(sample.prompt, sample.completions[i]),
    )
    if chosen_reward is not None:
        record.update(chosen_reward=chosen_reward, rejected_reward=rejected_reward)
    return with_ids(record, sample, rejected_ids=sample.ids(i))


def _refinement_example(sample: Scored, refinement: str, reward) -> dict:
    record = {k: v for k, v in sample.columns.items() if k not in OUTPUT_FIELDS}
    record.update(prompt=sample.prompt, completion=as_answer(sample.prompt, refinement), label=True)
    if reward is not None:
        record["reward"] = reward
    return record


def refiner_generate(model, tokenizer, settings, template: str = REFINE_TEMPLATE):
    """A `generate` for `refine`: the refiner's greedy answers to the requests, in order."""
    from prefopt.models.rollout import sample_prompts

    chat = bool(getattr(tokenizer, "chat_template", None))

    def generate(samples: list[Scored], originals: list[str]) -> list[str]:
        requests = [refinement_request(template, s, text, chat) for s, text in zip(samples, originals, strict=True)]
        return [group.completions[0] for group in sample_prompts(model, tokenizer, requests, settings)]

    return generate
