"""Examples -> token ids with an exact prompt/completion boundary.

- Text prompts are tokenized with the tokenizer's special tokens (BOS where it adds one);
  completions are the tokens of prompt+completion after the prompt's tokens, so merges
  across the boundary come out as at inference. When the prompt's tokens are not a prefix
  of prompt+completion's (a merge across the boundary), the completion is tokenized on its
  own instead and the case is counted: the mask stays exact either way.
- Conversational prompts are rendered with the chat template and `add_generation_prompt=True`;
  the completion is the rest of the rendering of prompt+completion. A template whose prompt
  rendering is not a prefix of the full one (e.g. one that rewrites earlier turns) is counted
  and handled the same way.
- EOS ends every completion exactly once: a completion that already contains EOS (chat
  templates close the assistant turn with it) is cut right after its last EOS; otherwise
  EOS is appended.
- Sampled ids (`prompt_ids` with `chosen_ids` / `rejected_ids` / `completion_ids`, written by
  `prefopt pairs`; DESIGN §6) are used as they are instead of re-tokenising the decoded text,
  which does not always give them back (non-canonical splits the model sampled, a cut
  multi-byte character, a completion cut without EOS). They are used only when they belong to
  this tokenizer and chat template: the stored `prompt_ids` equal the ids it renders for the
  prompt, both cut to `max_prompt_length` when that is set (so a prompt that sampling cut to
  the same length passes). Otherwise the text is tokenized and the example counted
  (`ids_mismatch`). Sampled ids are used unchanged: a finished
  completion ends with the EOS it was sampled with, a cut one (max_new_tokens) gets none
  appended. It did not end there: an appended EOS would make DPO score a token the policy
  never sampled, raising "stop here" on a cut chosen answer and lowering it on a cut rejected
  one. TRL's OnlineDPOTrainer likewise scores generated ids as they are, masking only after
  the first EOS.
- Truncation: the prompt keeps its end (at most `max_prompt_length` tokens); completions are
  cut at the end to fit `max_length`; an example whose prompt leaves no room is dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prefopt.data.files import DataError
from prefopt.data.formats import PairExample, SingleExample, Text


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int  # position in the tokenized dataset (keys the reference cache)
    where: str = ""  # source location, for messages

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class TokenizedSingle:
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    index: int
    where: str = ""
    # KTO's mismatched completion (another example's), set by attach_mismatched_completions
    kl_completion_ids: list[int] | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass
class TokenizeReport:
    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    boundary_retokenized: int = 0
    template_not_prefix: int = 0
    from_ids: int = 0  # completions taken from their stored sampled ids
    ids_mismatch: int = 0  # examples with stored ids of another tokenizer/template: tokenized from text
    # token counts before truncation, per part ("prompt", "chosen", "rejected" or "completion")
    lengths: dict[str, list[int]] = field(default_factory=dict)

    def note_length(self, part: str, n: int) -> None:
        self.lengths.setdefault(part, []).append(n)

    def ids_note(self) -> str | None:
        """One line on stored sampled ids, when the data had any; None otherwise."""
        if not self.from_ids and not self.ids_mismatch:
            return None
        text = f"{self.from_ids} completions used their sampled token ids"
        if self.ids_mismatch:
            text += (
                f"; {self.ids_mismatch} examples carried ids of another tokenizer or chat template "
                "(prompt_ids differ) and were tokenized from their text"
            )
        return text


class PreferenceTokenizer:
    """Tokenizes examples for one tokenizer and one length budget, and keeps a report."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int | None = None):
        if max_length < 2:
            raise DataError(f"max_length must be at least 2, got {max_length}")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.eos_id = tokenizer.eos_token_id
        self.report = TokenizeReport()

    # -- rendering ---------------------------------------------------------------------

    def _render(self, prompt: Text, completion: Text | None) -> str:
        if completion is None:
            return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.apply_chat_template(prompt + completion, tokenize=False)

    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def prompt_ids(self, prompt: Text) -> tuple[list[int], str]:
        if isinstance(prompt, list):
            if not getattr(self.tokenizer, "chat_template", None):
                raise DataError("conversational data needs a tokenizer with a chat template")
            text = self._render(prompt, None)
            return self._ids(text, special=False), text
        return self._ids(prompt, special=True), prompt

    def completion_ids(self, prompt: Text, prompt_text: str, prompt_ids: list[int], completion: Text) -> list[int]:
        conversational = isinstance(prompt, list)
        if conversational:
            if isinstance(completion, str):  # a bare reply to a conversation is one assistant turn
                completion = [{"role": "assistant", "content": completion}]
            full_text = self._render(prompt, completion)
        else:
            full_text = prompt_text + completion
        if not full_text.startswith(prompt_text):
            self.report.template_not_prefix += 1
            completion_text = full_text[len(os.path.commonprefix([prompt_text, full_text])) :]
            ids = self._ids(completion_text, special=False)
        else:
            full_ids = self._ids(full_text, special=not conversational)
            if full_ids[: len(prompt_ids)] == prompt_ids:
                ids = full_ids[len(prompt_ids) :]
            else:
                self.report.boundary_retokenized += 1
                ids = self._ids(full_text[len(prompt_text) :], special=False)
        return self._end_with_one_eos(ids)

    def _own_ids(self, stored_prompt, prompt_ids: list[int], *stored_completions) -> bool:
        """Whether an example's stored completion ids can be used: it has some, and its stored
        prompt ids are what this tokenizer renders, compared as training uses them (their last
        `max_prompt_length` tokens when that is set). An example whose ids fail is counted."""
        if all(ids is None for ids in stored_completions):
            return False
        stored, cut = list(stored_prompt or ()), self.max_prompt_length
        if stored and (stored[-cut:] == prompt_ids[-cut:] if cut else stored == prompt_ids):
            return True
        self.report.ids_mismatch += 1
        return False

    def _completion(self, prompt: Text, prompt_text: str, prompt_ids: list[int], text: Text, stored, own: bool):
        if own and stored is not None:
            self.report.from_ids += 1
            return list(stored)  # as sampled: EOS only if the completion ended with one
        return self.completion_ids(prompt, prompt_text, prompt_ids, text)

    def _end_with_one_eos(self, ids: list[int]) -> list[int]:
        if self.eos_id in ids:
            last = len(ids) - 1 - ids[::-1].index(self.eos_id)
            return ids[: last + 1]
        return ids + [self.eos_id]

    # -- truncation --------------------------------------------------------------------

    def _fit(self, prompt: list[int], completions: list[list[int]]):
        truncated = False
        if self.max_prompt_length and len(prompt) > self.max_prompt_length:
            prompt, truncated = prompt[-self.max_prompt_length :], True
        budget = self.max_length - len(prompt)
        if budget < 1:
            self.report.dropped_too_long += 1
            return None
        if any(len(c) > budget for c in completions):
            truncated = True
        self.report.truncated += truncated
        self.report.kept += 1
        return prompt, [c[:budget] for c in completions]

    # -- examples ----------------------------------------------------------------------

    def pair(self, example: PairExample, index: int) -> TokenizedPair | None:
        self.report.examples += 1
        prompt_ids, prompt_text = self.prompt_ids(example.prompt)
        own = self._own_ids(example.prompt_ids, prompt_ids, example.chosen_ids, example.rejected_ids)
        chosen = self._completion(example.prompt, prompt_text, prompt_ids, example.chosen, example.chosen_ids, own)
        rejected = self._completion(
            example.prompt, prompt_text, prompt_ids, example.rejected, example.rejected_ids, own
        )
        for part, ids in (("prompt", prompt_ids), ("chosen", chosen), ("rejected", rejected)):
            self.report.note_length(part, len(ids))
        fitted = self._fit(prompt_ids, [chosen, rejected])
        return None if fitted is None else TokenizedPair(fitted[0], *fitted[1], index=index, where=example.where)

    def single(self, example: SingleExample, index: int) -> TokenizedSingle | None:
        self.report.examples += 1
        prompt_ids, prompt_text = self.prompt_ids(example.prompt)
        own = self._own_ids(example.prompt_ids, prompt_ids, example.completion_ids)
        completion = self._completion(
            example.prompt, prompt_text, prompt_ids, example.completion, example.completion_ids, own
        )
        self.report.note_length("prompt", len(prompt_ids))
        self.report.note_length("completion", len(completion))
        fitted = self._fit(prompt_ids, [completion])
        return None if fitted is None else TokenizedSingle(fitted[0], fitted[1][0], example.label, index, example.where)

    def all(self, examples: list, log=print) -> list:
        """Tokenize every example; dropped ones are counted in the report, not returned.

        When the examples carried sampled ids, one line says how many were used (`log`)."""
        out = []
        for index, example in enumerate(examples):
            tokenized = self.pair(example, index) if isinstance(example, PairExample) else self.single(example, index)
            if tokenized is not None:
                tokenized.index = len(out)
                out.append(tokenized)
        note = self.report.ids_note()
        if note and log:
            log(f"prefopt: data: {note}")
        if not out:
            raise DataError(
                f"no example fits max_length={self.max_length}"
                + (f" with max_prompt_length={self.max_prompt_length}" if self.max_prompt_length else "")
                + f": all {self.report.examples} were dropped; raise max_length or set max_prompt_length"
            )
        return out


def attach_mismatched_completions(singles: list[TokenizedSingle], max_length: int) -> None:
    """Give example i the completion of example i + n//2 (mod n) for KTO's reference point.

    Fixed per example (as TRL pairs at dataset level), so reference values can be cached.
    The offset n//2 keeps the two halves of a pair (adjacent after `pairs_to_singles`) apart.
    """
    n = len(singles)
    shift = max(1, n // 2)
    for i, single in enumerate(singles):
        other = singles[(i + shift) % n].completion_ids
        single.kl_completion_ids = other[: max(1, max_length - len(single.prompt_ids))]
