"""Rewards that classify a user's reaction to an assistant's answer (for `prefopt data feedback`).

Called as every reward is, `f(prompts, completions)`, with the conversation up to and including
the assistant's answer as the prompt and the user's next message (the reaction) as the
completion. The score says what the user thought of the answer:
    +1  satisfied (the answer is desirable),  -1  dissatisfied (undesirable),
     0  neither (the user moved on, asked something else),  None  the classifier could not tell.

- `reaction_keywords`: a rule. A positive cue after a negation ("not right", "isn't
  correct", "doesn't look right") counts as negative, and is cut out of the text; then the
  negative cues ("wrong", "try again", ...) are counted and cut, then the positive ones. A
  leading "No" is negative. More negative than positive cues: -1; more positive: +1;
  otherwise 0.
- `reaction_judge`: a local causal LM reads `REACTION_QUESTION` (or the user's template: text
  with `{reaction}`, and optionally `{conversation}` and `{answer}`, the assistant's last turn)
  and we read its next-token probabilities of the three answer words ("yes", "no", "unclear", each summed over the first tokens of the spellings
  "yes", "Yes", " yes", " Yes" that no other word starts with). The likeliest word is the label. When the three words together hold less than
  `min_mass` of the next-token probability, the judge wanted to say something else: None
  (counted as unclear, never guessed).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from prefopt.rewards.judge import as_text, next_token_logits, question_ids
from prefopt.rewards.registry import RewardError, register_reward

NEGATIVE_CUES = (
    "not what i", "doesn't help", "don't think so", "wrong", "incorrect", "mistake", "try again", "nope",
    "useless", "rude", "unhelpful", "makes no sense",
)  # fmt: skip
POSITIVE_CUES = (
    "thanks", "thank you", "great", "perfect", "correct", "right", "exactly", "awesome", "helpful", "that works",
    "got it", "nice", "makes sense", "brilliant", "appreciate",
)  # fmt: skip
_LEADING_NO = re.compile(r"^\W*no\b")  # "No, it's 12." (but not "no worries" mid-sentence)
_NEGATION = r"(?:(?<!\w)not|n't)\s+(?:\w+\s+)?"  # "not right", "isn't correct", "doesn't look right"

# Few-shot: SmolLM2-135M-Instruct, asked a bare question about the shipped logs, said "no" to all
# 79 reactions; with these examples and calibration it gets 0.59 of them right (docs/data.md).
REACTION_QUESTION = """Classify how the user reacted to the assistant's answer.

Reply: "Thanks, that's right!" -> yes
Reply: "No, that is wrong." -> no
Reply: "What is the weather today?" -> unclear
Reply: "Great, it works." -> yes
Reply: "That's not helpful." -> no

Reply: "{reaction}" ->"""
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021's content-free inputs, for calibration

LABEL_WORDS = ("yes", "no", "unclear")
LABEL_SCORES = (1.0, -1.0, 0.0)


def _cue_count(text: str, cue: str, before: str = r"(?<!\w)") -> tuple[int, str]:
    """How often `cue` occurs as whole words (after `before`), and the text with them cut out."""
    pattern = re.compile(before + re.escape(cue) + r"(?!\w)")
    return len(pattern.findall(text)), pattern.sub(" ", text)


def _cues(extra: str) -> tuple[str, ...]:
    return tuple(c.strip().lower() for c in extra.split(",") if c.strip())


@register_reward("reaction_keywords")
def reaction_keywords(prompts, completions, *, positive: str = "", negative: str = "", **columns):
    """+1 / -1 / 0: the user's reaction (the completion) by positive and negative cue words.

    `positive`, `negative`: more cues, comma-separated (`--reward-arg negative="meh,not quite"`).
    """
    negatives = sorted(NEGATIVE_CUES + _cues(negative), key=len, reverse=True)
    positives = sorted(POSITIVE_CUES + _cues(positive), key=len, reverse=True)
    out = []
    for reaction in completions:
        text = " ".join(reaction.lower().replace("\u2019", "'").split())
        neg = 1 if _LEADING_NO.search(text) else 0
        text = _LEADING_NO.sub(" ", text)
        for cue in positives:  # negated praise first: "not right" is negative, never also "right"
            count, text = _cue_count(text, cue, _NEGATION)
            neg += count
        for cue in negatives:
            count, text = _cue_count(text, cue)
            neg += count
        pos = 0
        for cue in positives:
            count, text = _cue_count(text, cue)
            pos += count
        out.append(1.0 if pos > neg else -1.0 if neg > pos else 0.0)
    return out


def label_token_ids(tokenizer, words=LABEL_WORDS) -> list[list[int]]:
    """For each word, the first tokens of its spellings (lower case, capitalised, with and without a
    leading space). A token that starts spellings of two words says nothing (a byte-level
    tokenizer starts " yes" and " no" with the same space): it is left out; a word left with no
    token of its own is an error."""
    candidates = []
    for word in words:
        ids = set()
        for spelling in (word, word.capitalize(), " " + word, " " + word.capitalize()):
            tokens = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if tokens:
                ids.add(tokens[0])
        candidates.append(ids)
    out = []
    for word, ids in zip(words, candidates, strict=True):
        own = sorted(t for t in ids if sum(t in other for other in candidates) == 1)
        if not own:
            raise RewardError(f"reaction_judge: the tokenizer gives '{word}' no first token of its own")
        out.append(own)
    return out


@register_reward("reaction_judge")
class ReactionJudge:
    """A local causal LM says whether the user was satisfied with the answer: +1 yes, -1 no, 0 unclear.

    `calibrate`: divide by the words' probabilities for content-free reactions (Zhao et al. 2021);
    `min_mass`: below this total probability of the three words the answer is None (unclear)."""

    def __init__(
        self,
        model: str,
        template_file: str | None = None,
        calibrate: bool = True,
        min_mass: float = 0.01,
        batch_size: int = 8,
        dtype: str = "auto",
    ):
        from prefopt.models.inference import load_for_inference

        self.template = REACTION_QUESTION
        if template_file:
            if not Path(template_file).is_file():
                raise RewardError(f"{template_file}: no such template file")
            self.template = Path(template_file).read_text(encoding="utf-8")
        if "{reaction}" not in self.template:
            raise RewardError("reaction_judge: the template has no {reaction} placeholder")
        self.model, self.tokenizer = load_for_inference(model, dtype=dtype)
        self.labels = label_token_ids(self.tokenizer)
        self.min_mass, self.batch_size = float(min_mass), batch_size
        self.prior = None
        if calibrate:
            free = [[{"role": "assistant", "content": "N/A"}]] * len(CONTENT_FREE)
            self.prior = self.label_probabilities(free, list(CONTENT_FREE)).mean(dim=0)

    def question(self, conversation, reaction: str) -> list[int]:
        answer = conversation[-1]["content"] if isinstance(conversation, list) and conversation else ""
        text = (
            self.template.replace("{conversation}", as_text(conversation))
            .replace("{answer}", answer)
            .replace("{reaction}", reaction)
        )
        return question_ids(self.tokenizer, text)

    def label_probabilities(self, conversations, reactions) -> torch.Tensor:
        """(rows, 3): the next-token probability of each answer word, its spellings summed."""
        questions = [self.question(c, r) for c, r in zip(conversations, reactions, strict=True)]
        probabilities = next_token_logits(self.model, self.tokenizer, questions, self.batch_size).softmax(dim=-1)
        return torch.stack([probabilities[:, ids].sum(dim=-1) for ids in self.labels], dim=-1)

    def __call__(self, prompts, completions, **columns):
        probabilities = self.label_probabilities(prompts, completions)
        calibrated = probabilities / self.prior if self.prior is not None else probabilities
        out = []
        for row, weighed in zip(probabilities, calibrated, strict=True):
            if float(row.sum()) < self.min_mass:
                out.append(None)  # the judge's answer is none of the words: unclear, not guessed
            else:
                out.append(LABEL_SCORES[int(weighed.argmax())])
        return out
