"""Detect a record format and turn records into validated, normalised examples.

Formats (docs/data.md; the flow is in docs/design.md):
  standard        {"prompt": str, "chosen": str, "rejected": str}
  conversational  the same keys holding lists of {"role", "content"} messages
  implicit        only "chosen"/"rejected" full transcripts (text or messages); the prompt
                  is their longest common prefix, cut at a safe boundary (HH-RLHF style)
  unpaired        {"prompt", "completion", "label": bool} (KTO); text or messages
  sharegpt        {"conversations": [{"from", "value"}, ...], "chosen": {"from", "value"},
                  "rejected": {...}} (LLaMA-Factory's pairs; an optional "system" string): read as
                  conversational, `from` human/user -> user, gpt/assistant -> assistant, system

Sampled token ids (optional, any format but implicit; written by `prefopt pairs`): `prompt_ids`
with `chosen_ids` / `rejected_ids` (pairs) or `completion_ids` (unpaired), the tokens as they
were sampled. PreferenceTokenizer uses them instead of the text when its tokenizer renders the
same prompt ids. Other extra columns are ignored.

Prompt-only data (`{"prompt": str | messages, ...extra columns}`, DESIGN §6) is a fourth
format for sampling, not for training: `load_prompts` reads it (or the prompts of any
preference file) into PromptExample, extra columns kept for the reward functions.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from dataclasses import dataclass, field

from prefopt.data.files import DataError, Record

FORMATS = ("standard", "conversational", "implicit", "unpaired", "sharegpt")
PROMPT_FORMAT = "prompt"  # prompt-only: sampled from, never trained on directly

Messages = list  # list[dict[str, str]] with "role" and "content"
Text = str | list  # a string, or a list of messages

# HH-RLHF transcripts: the prompt ends right after the last shared "Assistant:" turn marker.
_ASSISTANT_MARKER = "\n\nAssistant:"


Ids = tuple[int, ...] | None  # sampled token ids kept with an example (a tuple: examples stay hashable)


@dataclass(frozen=True)
class PairExample:
    prompt: Text
    chosen: Text
    rejected: Text
    where: str
    # the tokens as sampled (`prefopt pairs`), used when they belong to the training tokenizer
    prompt_ids: Ids = None
    chosen_ids: Ids = None
    rejected_ids: Ids = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class SingleExample:
    prompt: Text
    completion: Text
    label: bool
    where: str
    prompt_ids: Ids = None
    completion_ids: Ids = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class NormaliseReport:
    """What happened to the records: kept, and dropped for which reason."""

    format: str = ""
    records: int = 0
    kept: int = 0
    identical_pairs: int = 0
    duplicates: int = 0
    empty_completions: int = 0
    warnings: list[str] = field(default_factory=list)


def detect_format(record: Record) -> str:
    keys = set(record.fields)
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired"
    if {"conversations", "chosen", "rejected"} <= keys and "prompt" not in keys:
        return "sharegpt"
    if {"chosen", "rejected"} <= keys:
        if "prompt" not in keys:
            return "implicit"
        return "conversational" if isinstance(record.fields["chosen"], list) else "standard"
    if "prompt" in keys and not keys & {"chosen", "rejected", "completion", "label"}:
        return PROMPT_FORMAT
    raise DataError(
        f"{record.where}: cannot tell the format: expected prompt/chosen/rejected, chosen/rejected, "
        f"prompt/completion/label, conversations/chosen/rejected (ShareGPT), or prompt alone; found {', '.join(sorted(keys)) or 'no fields'}"
    )


def _field(record: Record, name: str):
    if name not in record.fields or record.fields[name] is None:
        raise DataError(f"{record.where}: missing field '{name}'")
    return record.fields[name]


def _text(record: Record, name: str) -> str:
    value = _field(record, name)
    if not isinstance(value, str):
        raise DataError(f"{record.where}: field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{record.where}: field '{name}' is empty")
    return value


def _messages(record: Record, name: str) -> Messages:
    value = _field(record, name)
    if not isinstance(value, list):
        raise DataError(f"{record.where}: field '{name}' must be a list of messages, got {type(value).__name__}")
    if not value:
        raise DataError(f"{record.where}: field '{name}' is empty")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{record.where}: field '{name}', message {i}: needs a 'role' string")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{record.where}: field '{name}', message {i}: needs a 'content' string")
    # Keep only role/content: other keys (tool calls, names) would change how templates render.
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text_or_messages(record: Record, name: str) -> Text:
    return _messages(record, name) if isinstance(record.fields.get(name), list) else _text(record, name)


def _ids(record: Record, name: str) -> Ids:
    """An optional column of token ids: absent or null -> None; else a non-empty list of integers."""
    value = record.fields.get(name)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{record.where}: field '{name}' must be a non-empty list of token ids")
    for token in value:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            raise DataError(f"{record.where}: field '{name}' must hold token ids (integers >= 0), got {token!r}")
    return tuple(int(token) for token in value)


def _label(record: Record) -> bool:
    value = _field(record, "label")
    # CSV has no booleans: accept its spellings, nothing looser (1/"yes" could be a mistake).
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if type(value).__name__ not in ("bool", "bool_"):
        raise DataError(f"{record.where}: field 'label' must be a boolean (true/false), got {value!r}")
    return bool(value)


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Longest common prefix as the prompt, cut at a safe boundary.

    The cut is just after the last shared "\\n\\nAssistant:" when there is one (HH-RLHF), else
    after the last whitespace of the common prefix, so no word is split between prompt and reply.
    """
    common = os.path.commonprefix([chosen, rejected])
    marker = common.rfind(_ASSISTANT_MARKER)
    if marker >= 0:
        cut = marker + len(_ASSISTANT_MARKER)
    else:
        cut = max(common.rfind(c) for c in (" ", "\n", "\t")) + 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_implicit_messages(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


# ShareGPT's speakers (LLaMA-Factory, FastChat) -> chat-template roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _sharegpt_turns(record: Record, name: str, value) -> Messages:
    turns = value if isinstance(value, list) else [value]
    if not turns:
        raise DataError(f"{record.where}: field '{name}' is empty")
    messages = []
    for i, turn in enumerate(turns):
        at = f"{record.where}: field '{name}'" + (f", turn {i}" if isinstance(value, list) else "")
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("from"), str)
            or not isinstance(turn.get("value"), str)
        ):
            raise DataError(f"{at}: a ShareGPT turn needs 'from' and 'value' strings")
        role = SHAREGPT_ROLES.get(turn["from"].strip().lower())
        if role is None:
            known = ", ".join(SHAREGPT_ROLES)
            raise DataError(f"{at}: speaker '{turn['from']}' is not supported (from: {known})")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def read_conversation(record: Record) -> Messages:
    """A logged conversation as messages: `messages` (role/content turns), ShareGPT's
    `conversations` (from/value), or a conversational `prompt` followed by its `completion`."""
    fields = record.fields
    if fields.get("messages") is not None:
        return _messages(record, "messages")
    if fields.get("conversations") is not None:
        return _sharegpt_turns(record, "conversations", fields["conversations"])
    if isinstance(fields.get("prompt"), list) and isinstance(fields.get("completion"), list):
        return _messages(record, "prompt") + _messages(record, "completion")
    found = ", ".join(sorted(fields)) or "no fields"
    raise DataError(
        f"{record.where}: missing field 'messages' (a conversation log: messages, ShareGPT conversations, "
        f"or a conversational prompt and completion; found {found})"
    )


def _sharegpt_pair(record: Record) -> PairExample:
    prompt = _sharegpt_turns(record, "conversations", _field(record, "conversations"))
    system = record.fields.get("system")
    if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    if prompt[-1]["role"] != "user":
        raise DataError(f"{record.where}: field 'conversations' must end with a human/user turn (the prompt)")
    answers = []
    for name in ("chosen", "rejected"):
        turns = _sharegpt_turns(record, name, _field(record, name))
        if turns[0]["role"] != "assistant":
            raise DataError(f"{record.where}: field '{name}' must be the assistant's turn (from: gpt)")
        answers.append(turns)
    return PairExample(prompt, answers[0], answers[1], record.where)


def _pair(record: Record, fmt: str) -> PairExample | None:
    if fmt == "sharegpt":
        return _sharegpt_pair(record)
    if fmt in ("standard", "conversational"):
        read = _text if fmt == "standard" else _messages
        ids = _ids(record, "prompt_ids"), _ids(record, "chosen_ids"), _ids(record, "rejected_ids")
        return PairExample(read(record, "prompt"), read(record, "chosen"), read(record, "rejected"), record.where, *ids)
    chosen, rejected = _text_or_messages(record, "chosen"), _text_or_messages(record, "rejected")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise DataError(f"{record.where}: 'chosen' and 'rejected' must both be text or both be messages")
    if isinstance(chosen, list):
        prompt, chosen, rejected = _split_implicit_messages(chosen, rejected)
    else:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    if not prompt:
        raise DataError(f"{record.where}: 'chosen' and 'rejected' share no prompt (implicit-prompt format)")
    return PairExample(prompt, chosen, rejected, record.where)


def _is_blank(value: Text) -> bool:
    return not value.strip() if isinstance(value, str) else not any(m["content"].strip() for m in value)


def _key(*parts) -> str:
    return json.dumps(parts, sort_keys=True, ensure_ascii=False)


def check_trainable_format(fmt: str, where: str) -> None:
    """A format prefopt can train on (prompt-only data is sampled from first)."""
    if fmt == PROMPT_FORMAT:
        raise DataError(
            f"{where}: prompt-only data (no chosen/rejected or completion/label) cannot be trained "
            "on directly: sample and score it first (prefopt sample, prefopt pairs, or prefopt iterate)"
        )
    if fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")


class Normaliser:
    """Records -> PairExample / SingleExample one at a time, dropping identical pairs, empty
    completions and duplicates (across everything it has seen), counted in `report`."""

    def __init__(self, fmt: str):
        self.report = NormaliseReport(format=fmt)
        self._seen: set[bytes] = set()  # 16-byte digests: a million records cost ~70 MB, not their text

    def add(self, record: Record, fmt: str | None = None):
        """The record's example, or None when it is dropped. Raises DataError naming the record and field."""
        fmt = fmt or self.report.format
        report = self.report
        report.records += 1
        if fmt == "unpaired":
            example = SingleExample(
                _text_or_messages(record, "prompt"),
                _text_or_messages(record, "completion"),
                _label(record),
                record.where,
                _ids(record, "prompt_ids"),
                _ids(record, "completion_ids"),
            )
            key = _key(example.prompt, example.completion, example.label)
        else:
            example = _pair(record, fmt)
            if _is_blank(example.chosen) or _is_blank(example.rejected):
                report.empty_completions += 1
                return None
            if example.chosen == example.rejected:
                report.identical_pairs += 1
                return None
            key = _key(example.prompt, example.chosen, example.rejected)
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        if digest in self._seen:
            report.duplicates += 1
            return None
        self._seen.add(digest)
        report.kept += 1
        return example

    def finish(self) -> NormaliseReport:
        """The report with its warnings; raises DataError when nothing is left."""
        report = self.report
        if report.identical_pairs:
            report.warnings.append(f"dropped {report.identical_pairs} pairs whose chosen and rejected are identical")
        if report.duplicates:
            report.warnings.append(f"dropped {report.duplicates} duplicate records")
        if report.empty_completions:
            report.warnings.append(
                f"dropped {report.empty_completions} pairs with an empty completion after the prompt"
            )
        if not report.kept:
            raise DataError("no usable records remain after dropping identical, duplicate and empty ones")
        return report


def normalise(records: list[Record], fmt: str | None = None) -> tuple[list, NormaliseReport]:
    """Validate records into PairExample / SingleExample; drop identical pairs and duplicates.

    Raises DataError for the first bad record, naming its location and field.
    """
    if not records:
        raise DataError("no records")
    fmt = fmt or detect_format(records[0])
    check_trainable_format(fmt, records[0].where)
    normaliser = Normaliser(fmt)
    examples = [example for record in records if (example := normaliser.add(record)) is not None]
    return examples, normaliser.finish()


def pairs_to_singles(pairs: list[PairExample]) -> list[SingleExample]:
    """Paired data for unpaired losses (KTO): each pair gives one desirable and one undesirable example."""
    singles = []
    for pair in pairs:
        singles.append(SingleExample(pair.prompt, pair.chosen, True, pair.where, pair.prompt_ids, pair.chosen_ids))
        singles.append(SingleExample(pair.prompt, pair.rejected, False, pair.where, pair.prompt_ids, pair.rejected_ids))
    return singles


# -- prompt-only data -------------------------------------------------------------------


@dataclass(frozen=True)
class PromptExample:
    """A prompt to sample from, with its extra columns (e.g. `answer`) for the reward functions."""

    prompt: Text
    columns: dict
    where: str

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class PromptReport:
    format: str = ""  # the file's own format: "prompt", or a preference format whose prompts are used
    records: int = 0
    kept: int = 0
    duplicates: int = 0
    columns: list[str] = field(default_factory=list)


def _prompt_of(record: Record, fmt: str) -> tuple[Text, dict]:
    if fmt == "implicit":
        pair = _pair(record, fmt)
        # a preference file's answers stay available (e.g. `--against chosen` battles them)
        return pair.prompt, {"chosen": pair.chosen, "rejected": pair.rejected}
    prompt = _text_or_messages(record, "prompt")
    return prompt, {k: v for k, v in record.fields.items() if k != "prompt"}


def normalise_prompts(records: list[Record], fmt: str | None = None) -> tuple[list[PromptExample], PromptReport]:
    """Records of any format -> PromptExample, de-duplicated by prompt (the first record's columns win).

    Prompt-only records keep all their other fields as columns; a preference file's prompts are
    used, with its other fields (chosen, rejected, ...) as columns.
    """
    if not records:
        raise DataError("no records")
    fmt = fmt or detect_format(records[0])
    if fmt not in (*FORMATS, PROMPT_FORMAT):
        raise DataError(f"unknown format '{fmt}'; choose one of {', '.join((*FORMATS, PROMPT_FORMAT))}")
    report = PromptReport(format=fmt, records=len(records))
    examples, seen, columns = [], set(), {}
    for record in records:
        if fmt == PROMPT_FORMAT and "prompt" not in record.fields:
            raise DataError(f"{record.where}: missing field 'prompt' (a prompts file needs a 'prompt' on every line)")
        prompt, extra = _prompt_of(record, fmt)
        key = _key(prompt)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        columns.update(dict.fromkeys(extra))
        examples.append(PromptExample(prompt, extra, record.where))
    report.kept = len(examples)
    report.columns = list(columns)
    return examples, report


def load_prompts(
    paths, fmt: str | None = None, columns: dict | None = None
) -> tuple[list[PromptExample], PromptReport]:
    """Prompts from prompt-only files, or from the prompts of preference files (any source of
    prefopt.data.sources: files, hub ids, a Dataset, a list of dicts); `columns` renames fields."""
    from prefopt.data.files import read_records
    from prefopt.data.sources import rename_columns

    records = [rename_columns(record, columns or {}) for record in read_records(paths)]
    first = records[0].fields
    if fmt is None and "prompt" not in first and not {"chosen", "rejected"} <= set(first):
        found = ", ".join(sorted(first)) or "no fields"
        raise DataError(f"{records[0].where}: missing field 'prompt' (found {found})")
    return normalise_prompts(records, fmt)
