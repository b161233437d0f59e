"""Conversation logs -> KTO (or SFT) data, labelled by how the user reacted to each answer.

The notes' "LearnFromFeedback" recipe: in real conversations, find the turns where the user
reacts to an assistant's answer and classify the reaction; positive reactions make SFT data,
positive and negative together make KTO data (unpaired, desirable / undesirable).

For each log (messages, ShareGPT conversations, or a conversational prompt + completion;
`formats.read_conversation`), every assistant turn directly followed by a user turn is a
candidate: its prompt is the conversation before it, its completion the assistant turn, its
reaction the user's next message. A classifier (a registered reward called with the
conversation through the answer as the prompt and the reaction as the completion:
`rewards/reaction.py`) labels it: score > 0 desirable, < 0 undesirable, 0 neither (not
written), None unclear (not written, counted apart). Logs without an assistant turn, assistant
turns nobody answered, empty answers and answers with no request before them are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefopt.data.files import read_records
from prefopt.data.formats import read_conversation


@dataclass
class Turn:
    """An assistant turn a user reacted to."""

    prompt: list[dict]  # the conversation before the answer
    answer: dict  # the assistant's turn
    reaction: str  # the user's next message
    where: str


@dataclass
class FeedbackReport:
    logs: int = 0
    no_assistant: int = 0  # logs without any assistant turn
    answers: int = 0  # assistant turns
    unanswered: int = 0  # the conversation ends there, or an assistant turn follows
    empty: int = 0  # blank answers
    no_request: int = 0  # the conversation opens with the assistant: no prompt to train on
    desirable: int = 0
    undesirable: int = 0
    neither: int = 0
    unclear: int = 0  # the classifier could not tell (a judge that named no label)
    written: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def reactions(self) -> int:
        return self.desirable + self.undesirable + self.neither + self.unclear

    def summary(self) -> str:
        return (
            f"{self.logs} logs, {self.answers} assistant turns, {self.reactions} with a reaction: "
            f"{self.desirable} desirable, {self.undesirable} undesirable, {self.neither} neither, "
            f"{self.unclear} unclear (not labelled); not used: {self.unanswered} unanswered, {self.empty} empty, "
            f"{self.no_request} without a request, {self.no_assistant} logs without an assistant turn"
        )

    def why_empty(self, positive_only: bool) -> str:
        if not self.answers:
            return f"none of the {self.logs} logs has an assistant turn"
        if not self.reactions:
            return f"no assistant turn of {self.answers} is followed by a user turn (a reaction)"
        if self.unclear == self.reactions:
            return f"the classifier could not label any of the {self.reactions} reactions (all unclear)"
        wanted = "positive" if positive_only else "positive or negative"
        return f"none of the {self.reactions} reactions was {wanted}"


def reacted_turns(paths, report: FeedbackReport) -> list[Turn]:
    """Every assistant turn followed by a user turn, in file order; the rest counted in `report`."""
    turns = []
    for record in read_records(paths):
        report.logs += 1
        messages = read_conversation(record)
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not answers:
            report.no_assistant += 1
            if len(report.notes) < 5:
                report.notes.append(f"{record.where}: no assistant turn; skipped")
            continue
        report.answers += len(answers)
        for i in answers:
            if i + 1 >= len(messages) or messages[i + 1]["role"] != "user":
                report.unanswered += 1
            elif not messages[i]["content"].strip():
                report.empty += 1
            elif not any(m["role"] == "user" for m in messages[:i]):
                report.no_request += 1
            else:
                turns.append(Turn(messages[:i], messages[i], messages[i + 1]["content"], f"{record.where}, turn {i}"))
    return turns


def label_turns(turns: list[Turn], classifier, report: FeedbackReport) -> list[bool | None]:
    """True (desirable), False (undesirable) or None (neither or unclear) per turn, from one classifier call."""
    scores = classifier([t.prompt + [t.answer] for t in turns], [t.reaction for t in turns]) if turns else []
    labels = []
    for score in scores:
        if score is None:
            report.unclear += 1
            labels.append(None)
        elif score > 0:
            report.desirable += 1
            labels.append(True)
        elif score < 0:
            report.undesirable += 1
            labels.append(False)
        else:
            report.neither += 1
            labels.append(None)
    return labels


def feedback_records(paths, classifier, positive_only: bool = False) -> tuple[list[dict], FeedbackReport]:
    """KTO records (prompt, completion, label, reaction); with `positive_only` the desirable ones (SFT data)."""
    report = FeedbackReport()
    turns = reacted_turns(paths, report)
    labels = label_turns(turns, classifier, report)
    records = [
        {"prompt": turn.prompt, "completion": [turn.answer], "label": label, "reaction": turn.reaction}
        for turn, label in zip(turns, labels, strict=True)
        if label is True or (label is False and not positive_only)
    ]
    report.written = len(records)
    return records, report


def kto_weight_advice(desirable: int, undesirable: int) -> str:
    """KTO's rule for unbalanced data (Ethayarajh et al. 2024, as TRL's KTOTrainer documents it):
    lambda_D * n_D / (lambda_U * n_U) should lie in [1, 4/3]. With lambda_U = 1 that is
    lambda_D in [n_U / n_D, 4/3 * n_U / n_D]; the advice is the interval's middle."""
    if not desirable or not undesirable:
        missing = "desirable" if not desirable else "undesirable"
        return f"no {missing} examples: KTO needs both labels (or train the desirable ones with --loss sft)"
    low, high = undesirable / desirable, 4 / 3 * undesirable / desirable
    middle = round((low + high) / 2, 2)
    return (
        f"KTO's rule (Ethayarajh et al. 2024): desirable_weight * {desirable} / (undesirable_weight * "
        f"{undesirable}) in [1, 4/3], so with undesirable_weight 1: desirable_weight {low:.2f}-{high:.2f}, "
        f"e.g. --loss-arg desirable_weight={middle}"
    )
