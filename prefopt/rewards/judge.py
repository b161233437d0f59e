"""`judge`: a local causal LM asked which of two answers is better, in both orders, averaged.

For a prompt x and answers a, b the judge reads one question ("... Response A ... Response B
... Which response is better? Answer A or B.") and we take its next-token probabilities of
"A" and "B", renormalised over the two: p(a first) = P(A) / (P(A) + P(B)). LLM judges favour
one position, so the question is asked again with the answers swapped and
    P(a beats b) = (p_A(a, b) + p_B(b, a)) / 2,
which is 0.5 for a judge that only ever says "A". As a reward (one score per completion) the
judge compares each completion with a reference answer from a column (`against`, default
`answer`): the score is the probability the completion wins.
"""

from __future__ import annotations

import torch

from prefopt.rewards.registry import RewardError, register_reward

QUESTION = (
    "You are comparing two responses to the same request.\n\n"
    "[Request]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Which response is better: more correct, more helpful, more direct? Answer with one letter, A or B."
)


def as_text(value) -> str:
    """A message list as 'role: content' lines (the judge reads one conversation as plain text)."""
    if isinstance(value, list):
        if len(value) == 1:
            return value[0]["content"]
        return "\n".join(f"{m['role']}: {m['content']}" for m in value)
    return str(value)


def letter_ids(tokenizer) -> list[int]:
    """The tokens of "A" and "B" as the judge's next token. After a chat template's assistant
    header the answer starts a fresh turn: "A". Without a template the question ends "Answer:",
    after which a BPE tokenizer's natural next token is " A" (one token, with its space): read
    that one when the tokenizer has it, else "A"."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for letter in ("A", "B"):
        spaced = tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
        ids = spaced if not chat and len(spaced) == 1 else tokenizer(letter, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RewardError(f"judge: the tokenizer has no token for '{letter}'")
        out.append(ids[0])
    if out[0] == out[1]:
        raise RewardError("judge: the tokenizer gives 'A' and 'B' the same first token")
    return out


def question_ids(tokenizer, text: str) -> list[int]:
    """A judge's question as token ids: the user turn under the chat template (and the assistant
    header after it), or without a template the plain text followed by "\nAnswer:"."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text + "\nAnswer:")["input_ids"]


@torch.no_grad()
def next_token_logits(model, tokenizer, questions: list[list[int]], batch_size: int = 8) -> torch.Tensor:
    """(len(questions), vocab) float32 logits of the token after each question (right-padded
    batches; only the last hidden state of each row goes through the output head)."""
    from prefopt.models.logps import last_hidden_state, output_head
    from prefopt.rewards.reward_model import pad_right

    device = next(model.parameters()).device
    out = []
    for start in range(0, len(questions), batch_size):
        ids, mask = pad_right(questions[start : start + batch_size], tokenizer.pad_token_id, device)
        hidden = last_hidden_state(model, {"input_ids": ids, "attention_mask": mask, "use_cache": False})
        last = hidden[torch.arange(len(ids), device=device), mask.sum(1) - 1]
        out.append(output_head(model)(last).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@register_reward("judge")
class Judge:
    """A local causal LM judges completion vs the column `against`, both orders averaged: P(completion wins)."""

    def __init__(self, model: str, against: str = "answer", batch_size: int = 8, dtype: str = "auto"):
        from prefopt.models.inference import load_for_inference

        self.model, self.tokenizer = load_for_inference(model, dtype=dtype)
        self.against, self.batch_size = against, batch_size
        self.letters = letter_ids(self.tokenizer)

    def _question_ids(self, prompt, a, b) -> list[int]:
        return question_ids(self.tokenizer, QUESTION.format(prompt=as_text(prompt), a=as_text(a), b=as_text(b)))

    def first_letter_probability(self, questions: list[list[int]]) -> list[float]:
        """P("A") / (P("A") + P("B")) as the judge's next token, per question."""
        logits = next_token_logits(self.model, self.tokenizer, questions, self.batch_size)
        return logits[:, self.letters].softmax(dim=-1)[:, 0].tolist()

    def compare(self, prompts, a, b, **columns) -> list[float]:
        """P(a beats b) per row, the mean over both orders."""
        forward = [self._question_ids(p, x, y) for p, x, y in zip(prompts, a, b, strict=True)]
        swapped = [self._question_ids(p, y, x) for p, x, y in zip(prompts, a, b, strict=True)]
        p_first = self.first_letter_probability(forward + swapped)
        n = len(forward)
        return [(p_first[i] + (1.0 - p_first[n + i])) / 2 for i in range(n)]

    def __call__(self, prompts, completions, **columns):
        if self.against not in columns:
            raise RewardError(
                f"judge compares with the column '{self.against}' (--reward-arg against=COLUMN); "
                f"found: {', '.join(sorted(columns)) or 'no extra columns'}"
            )
        references = columns[self.against]
        scores = self.compare(prompts, completions, [r if r is not None else "" for r in references])
        return [None if r is None else s for s, r in zip(scores, references, strict=True)]
