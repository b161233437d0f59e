"""Scored samples -> training data: preference pairs, KTO examples, or best-of-N SFT data.

Input: a samples file from `prefopt sample` (one line per prompt: prompt, completions,
rewards, ...extra columns). Per prompt, unscorable completions (reward None) are dropped and
counted, and then:

- pairs, `best-worst` (default): the best completion against the worst;
  `best-random`: the best against a random one scored lower; `all`: every two completions
  whose rewards differ. Equal rewards are a tie: no pair, counted. `min_margin` drops pairs
  whose reward gap is smaller (counted too).
- `unpaired` (KTO): every completion, label = reward >= threshold.
- `best_of_n` (rejection sampling): the best completion as SFT data (label true), optionally
  only when its reward reaches the threshold.
- `against` (ArenaLearning): each sample battles a reference answer (a column, or the best
  completion of the same prompt in another samples file); the battles the policy loses become
  pairs, the stronger answer chosen. The reward judges: a pairwise reward (`judge`) compares
  the two directly, any other reward scores the reference answer and compares numbers.

Pairs are written in the standard format (conversational when prompts are messages) plus
`chosen_reward` / `rejected_reward`, so `prefopt train` reads them as they are.

Sampled token ids (DESIGN §6: never re-tokenised text): when the samples file has `prompt_ids`
and `completion_ids` (as `prefopt sample` writes them), each record also carries `prompt_ids`
and the ids of its completions (`chosen_ids` / `rejected_ids`, or `completion_ids` for KTO and
best-of-N data), exactly as sampled: with the closing EOS when the completion finished, without
one when it was cut at max_new_tokens. Training uses them instead of re-tokenising the text when
its tokenizer renders the same prompt ids (prefopt/data/tokenize.py). Older samples files
without `prompt_ids` give text-only records. In `against` battles only the policy's side (the
rejected answer) has ids: the reference answer is text, from a column or another model.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from prefopt.data.files import DataError, Record, read_records
from prefopt.errors import PrefoptError

SELECTIONS = ("best-worst", "best-random", "all")
_SAMPLE_FIELDS = ("prompt", "prompt_ids", "completions", "rewards", "finished", "completion_ids")
# a sample's own columns never overwrite these in the records written (a preference file used as
# prompts brings chosen/rejected and maybe their ids along; stale ids would describe other text)
OUTPUT_FIELDS = (
    "chosen",
    "rejected",
    "completion",
    "label",
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "completion_ids",
)


@dataclass
class Scored:
    """One prompt's samples from a samples file."""

    prompt: object
    completions: list[str]
    rewards: list[float | None] | None
    columns: dict
    where: str
    completion_ids: list | None = None  # as sampled, one list per completion
    prompt_ids: list | None = None  # the prompt as sampling rendered it

    def ids(self, i: int) -> list[int] | None:
        """Completion i's sampled ids, when the file has both them and the prompt's ids (else None: text only)."""
        return self.completion_ids[i] if self.completion_ids is not None and self.prompt_ids is not None else None


@dataclass
class PairReport:
    prompts: int = 0
    completions: int = 0
    unscorable: int = 0
    empty: int = 0  # blank completions (training drops them): never chosen, rejected or written
    ties: int = 0  # prompts (or battles) where rewards were equal: no pair
    below_margin: int = 0
    written: int = 0
    battles: int = 0
    policy_wins: int = 0
    policy_losses: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self, what: str = "pairs") -> str:
        text = (
            f"{self.written} {what} from {self.prompts} prompts ({self.completions} completions; "
            f"dropped: {self.unscorable} unscorable, {self.ties} ties, {self.below_margin} below the margin"
            + (f", {self.empty} empty" if self.empty else "")
            + ")"
        )
        if self.battles:
            text += f"; battles: {self.battles}, policy won {self.policy_wins}, lost {self.policy_losses}"
        return text

    def why_empty(self, what: str = "pairs") -> str:
        if not self.completions:
            return "the samples file has no completions"
        if self.unscorable == self.completions:
            return f"all {self.completions} completions were unscorable (reward None)"
        if self.unscorable + self.empty == self.completions:
            return f"all {self.completions} completions were unscorable or empty"
        if self.battles and not self.policy_losses:
            return f"the policy won or tied all {self.battles} battles: there is nothing to learn from"
        if self.ties and not self.below_margin:
            return f"all {self.ties} prompts were ties (every completion of a prompt got the same reward)"
        return f"{self.ties} ties and {self.below_margin} pairs below the margin left no {what}"


def _scored(record: Record, need_rewards: bool) -> Scored:
    fields = record.fields
    for name in ("prompt", "completions"):
        if name not in fields:
            raise DataError(f"{record.where}: missing field '{name}' (is this a samples file from prefopt sample?)")
    completions, rewards = fields["completions"], fields.get("rewards")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise DataError(f"{record.where}: field 'completions' must be a list of strings")
    if rewards is None and need_rewards:
        raise DataError(f"{record.where}: no 'rewards': sample with --reward NAME, or give pairs a --reward")
    if rewards is not None:
        if not isinstance(rewards, list) or len(rewards) != len(completions):
            count = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
            raise DataError(f"{record.where}: {len(completions)} completions but {count} rewards")
        for i, value in enumerate(rewards):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise DataError(f"{record.where}: reward {i} is not a number: {value!r}")
    # rewards/NAME: each of several rewards' scores (sample writes them): per completion, not columns
    columns = {k: v for k, v in fields.items() if k not in _SAMPLE_FIELDS and not k.startswith("rewards/")}
    completion_ids, prompt_ids = fields.get("completion_ids"), fields.get("prompt_ids")
    if completion_ids is not None and (
        not isinstance(completion_ids, list)
        or len(completion_ids) != len(completions)
        or not all(_token_ids(ids) for ids in completion_ids)
    ):
        raise DataError(
            f"{record.where}: field 'completion_ids' must hold one list of token ids per completion "
            f"({len(completions)})"
        )
    if prompt_ids is not None and not _token_ids(prompt_ids):
        raise DataError(f"{record.where}: field 'prompt_ids' must be a list of token ids")
    return Scored(fields["prompt"], completions, rewards, columns, record.where, completion_ids, prompt_ids)


def _token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def read_samples(paths, need_rewards: bool = True) -> list[Scored]:
    return [_scored(record, need_rewards) for record in read_records(paths)]


def rescore(samples: list[Scored], reward) -> int:
    """Score every completion with `reward` (one call); returns how many were unscorable."""
    from prefopt.data.formats import PromptExample
    from prefopt.models.rollout import Samples, score_samples

    prompts = [PromptExample(s.prompt, s.columns, s.where) for s in samples]
    groups = [Samples([], [], s.completions, []) for s in samples]
    rewards, unscorable = score_samples(reward, prompts, groups)
    for sample, scores in zip(samples, rewards, strict=True):
        sample.rewards = scores
    return unscorable


def as_answer(prompt, text) -> object:
    """A completion as training reads it: text after a text prompt, one assistant turn after messages."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _reference_text(value) -> str | None:
    if isinstance(value, list):  # messages: the last turn's text
        return value[-1]["content"] if value else None
    return None if value is None else str(value)


def with_ids(record: dict, sample: Scored, **ids) -> dict:
    """Add the prompt's and the completions' sampled ids, those there are (none when the file has none)."""
    ids = {name: value for name, value in ids.items() if value is not None}
    if ids:
        record["prompt_ids"] = sample.prompt_ids
        record.update(ids)
    return record


def _pair(sample: Scored, chosen: int | str, rejected: int, chosen_reward: float, rejected_reward: float) -> dict:
    """chosen: a completion's index, or a reference answer's text (a battle: it has no sampled ids)."""
    record = {k: v for k, v in sample.columns.items() if k not in OUTPUT_FIELDS}
    chosen_text = chosen if isinstance(chosen, str) else sample.completions[chosen]
    record.update(
        prompt=sample.prompt,
        chosen=as_answer(sample.prompt, chosen_text),
        rejected=as_answer(sample.prompt, sample.completions[rejected]),
        chosen_reward=chosen_reward,
        rejected_reward=rejected_reward,
    )
    chosen_ids = None if isinstance(chosen, str) else sample.ids(chosen)
    return with_ids(record, sample, chosen_ids=chosen_ids, rejected_ids=sample.ids(rejected))


def _scored_indices(sample: Scored, report: PairReport) -> list[int]:
    report.prompts += 1
    report.completions += len(sample.completions)
    scored = [i for i, r in enumerate(sample.rewards) if r is not None]
    report.unscorable += len(sample.completions) - len(scored)
    kept = [i for i in scored if sample.completions[i].strip()]  # an empty answer is no training example
    report.empty += len(scored) - len(kept)
    return kept


def select_pairs(samples: list[Scored], selection: str = "best-worst", min_margin: float = 0.0, seed: int = 0):
    """(pair records, report). Ties and pairs with a reward gap below `min_margin` are dropped and counted."""
    if selection not in SELECTIONS:
        raise PrefoptError(f"selection must be one of {', '.join(SELECTIONS)}, got '{selection}'")
    rng = random.Random(seed)
    report, out = PairReport(), []
    for sample in samples:
        kept = _scored_indices(sample, report)
        if len(kept) < 2:
            continue
        rewards = sample.rewards
        best = max(kept, key=lambda i: rewards[i])  # the first of equals
        if selection == "all":
            candidates = [(i, j) for i in kept for j in kept if rewards[i] > rewards[j]]
            candidates = [(i, j) for i, j in candidates if sample.completions[i] != sample.completions[j]]
        elif selection == "best-worst":
            worst = min(kept, key=lambda i: rewards[i])
            candidates = [(best, worst)] if rewards[best] > rewards[worst] else []
        else:
            lower = [j for j in kept if rewards[j] < rewards[best]]
            candidates = [(best, rng.choice(lower))] if lower else []
        if not candidates:
            report.ties += 1
            continue
        for i, j in candidates:
            if rewards[i] - rewards[j] < min_margin:
                report.below_margin += 1
                continue
            out.append(_pair(sample, i, j, rewards[i], rewards[j]))
    report.written = len(out)
    return out, report


def select_unpaired(samples: list[Scored], threshold: float):
    """KTO data: every scored completion (duplicates of one prompt once), label = reward >= threshold."""
    report, out = PairReport(), []
    for sample in samples:
        seen = set()
        for i in _scored_indices(sample, report):
            if sample.completions[i] in seen:
                continue
            seen.add(sample.completions[i])
            reward = sample.rewards[i]
            out.append(_single(sample, i, reward >= threshold))
    report.written = len(out)
    return out, report


def _single(sample: Scored, i: int, label: bool) -> dict:
    record = {k: v for k, v in sample.columns.items() if k not in OUTPUT_FIELDS}
    record.update(
        prompt=sample.prompt,
        completion=as_answer(sample.prompt, sample.completions[i]),
        label=label,
        reward=sample.rewards[i],
    )
    return with_ids(record, sample, completion_ids=sample.ids(i))


def select_best_of_n(samples: list[Scored], threshold: float | None = None):
    """Rejection sampling: each prompt's best completion (label true), if it reaches `threshold`."""
    report, out = PairReport(), []
    for sample in samples:
        kept = _scored_indices(sample, report)
        if not kept:
            continue
        best = max(kept, key=lambda i: sample.rewards[i])
        if threshold is not None and sample.rewards[best] < threshold:
            report.below_margin += 1
            continue
        out.append(_single(sample, best, True))
    report.written = len(out)
    return out, report


def references_from_file(samples: list[Scored], path) -> list[tuple[str | None, float | None]]:
    """Each prompt's reference from another model's samples file: its best completion (by reward), or its first."""
    by_prompt = {}
    for other in read_samples(path, need_rewards=False):
        key = json.dumps(other.prompt, sort_keys=True)
        if not other.completions:
            continue
        if other.rewards and any(r is not None for r in other.rewards):
            best = max((i for i, r in enumerate(other.rewards) if r is not None), key=lambda i: other.rewards[i])
            by_prompt[key] = (other.completions[best], other.rewards[best])
        else:
            by_prompt[key] = (other.completions[0], None)
    return [by_prompt.get(json.dumps(s.prompt, sort_keys=True), (None, None)) for s in samples]


def battle(samples: list[Scored], references: list[tuple[str | None, float | None]], reward=None, min_margin=0.0):
    """ArenaLearning: each sample against its prompt's reference; the policy's losses become pairs.

    With a pairwise reward (`reward.compare`), p = P(sample beats reference) and the scores are
    (p, 1 - p). Otherwise the sample's reward is compared with the reference's (from the other
    samples file, or computed here with `reward`).
    """
    report, out, rows = PairReport(), [], []  # rows: (sample, completion index, reference text)
    for s, (sample, (reference, _)) in enumerate(zip(samples, references, strict=True)):
        report.prompts += 1
        report.completions += len(sample.completions)
        if reference is None:
            report.notes.append(f"{sample.where}: no reference answer; skipped")
            continue
        rows += [(s, i, reference) for i in range(len(sample.completions))]
    if not rows:
        return out, report
    prompts = [samples[s].prompt for s, _, _ in rows]
    theirs = [reference for _, _, reference in rows]
    if reward is not None and reward.compare is not None:
        wins = reward.compare(prompts, [samples[s].completions[i] for s, i, _ in rows], theirs)
        scores = [(p, 1.0 - p) for p in wins]  # (sample, reference)
    else:
        if any(samples[s].rewards is None for s, _, _ in rows):
            raise PrefoptError("--against with a pointwise reward needs the samples' rewards: sample with --reward")
        given = [references[s][1] for s, _, _ in rows]
        if reward is not None:
            # --reward rescored the samples: the references are scored by it too, never compared by
            # the rewards stored in another samples file (perhaps another reward's, on another scale)
            names = {name for s, _, _ in rows for name in samples[s].columns}
            columns = {name: [samples[s].columns.get(name) for s, _, _ in rows] for name in sorted(names)}
            given = reward(prompts, theirs, **columns)
        elif any(g is None for g in given):
            raise PrefoptError("--against: the reference answers have no rewards; give pairs a --reward to score them")
        scores = [(samples[s].rewards[i], g) for (s, i, _), g in zip(rows, given, strict=True)]
    for (s, i, reference), (own, other) in zip(rows, scores, strict=True):
        if own is None or other is None:
            report.unscorable += 1
            continue
        report.battles += 1
        if own > other:
            report.policy_wins += 1
        elif own == other:
            report.ties += 1
        else:
            report.policy_losses += 1
            if other - own < min_margin:
                report.below_margin += 1
                continue
            out.append(_pair(samples[s], reference, i, other, own))
    report.written = len(out)
    return out, report


def reference_column(samples: list[Scored], column: str) -> list[tuple[str | None, None]]:
    missing = [s.where for s in samples if column not in s.columns]
    if missing:
        raise DataError(f"{missing[0]}: --against {column}: no such column in the samples file")
    return [(_reference_text(s.columns[column]), None) for s in samples]
