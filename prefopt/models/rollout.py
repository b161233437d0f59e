"""Sampling: N completions per prompt, the prompt prefilled once and its KV cache shared (DESIGN §6).

`model.generate(num_return_sequences=N)` copies each prompt N times *before* the first
forward, so the prompt is prefilled N times. Here a batch of prompts (left-padded) runs
through the model once, without its last token, into a DynamicCache; the cache is then
repeated N times along the batch (`batch_repeat_interleave`) and `generate` continues from it:
its first forward sees only the last prompt token of each of the B*N rows. Positions come
from the attention mask in both steps, as `generate` computes them, so the continuation is
the one plain generation would produce (token for token at temperature 0).

Completion token ids are kept as generated (never re-tokenised text); `finished` says whether
a completion ended with EOS within `max_new_tokens`. Temperature 0 means greedy decoding.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefopt.data.formats import PromptExample
from prefopt.errors import PrefoptError


@dataclass
class SampleSettings:
    num_samples: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off (as TRL and vLLM sample by default)
    seed: int = 0
    batch_size: int = 8  # prompts per generate call (B prompts -> B * num_samples rows)
    max_prompt_length: int | None = None  # keep the end of longer prompts
    shared_prefill: bool = True  # False: plain generate(num_return_sequences=N), for comparison

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise PrefoptError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise PrefoptError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PrefoptError(f"top-p must be in (0, 1], got {self.top_p}")


@dataclass
class Samples:
    """The N completions of one prompt."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]  # as generated, up to and including EOS when finished
    completions: list[str]  # decoded, without the closing EOS
    finished: list[bool]
    token_logps: list | None = None  # the sampler's log-prob of each completion token (1-D tensors)


@dataclass
class SampleStats:
    prompts: int = 0
    completions: int = 0
    completion_tokens: int = 0
    finished: int = 0
    seconds: float = 0.0
    prefill_tokens: int = 0  # prompt tokens run through the model (shared: once per prompt)
    empty: int = 0  # completions with no text (the model ended at once, or wrote only spaces)
    plain_prompts: int = 0  # prompts given as text, not messages
    extra: dict = field(default_factory=dict)

    def empty_warning(self, chat_model: bool) -> str | None:
        """One line when most completions are empty, with the likely cause; None otherwise."""
        return empty_completions_warning(self.empty, self.completions, self.plain_prompts == self.prompts, chat_model)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0


def empty_completions_warning(empty: int, total: int, plain_prompts: bool, chat_model: bool) -> str | None:
    """Most completions empty: say so, and why it usually happens. A chat model given plain text
    (no chat template applied) often answers with its end-of-turn token at once: pass the prompts
    as messages, [{"role": "user", "content": ...}], so its template is applied."""
    if not total or empty * 2 < total:
        return None
    text = f"{empty} of {total} completions are empty (the model ended at once)"
    if plain_prompts and chat_model:
        text += (
            "; the prompts are plain text and this model has a chat template: give them as messages "
            '([{"role": "user", "content": ...}]) so the template is applied'
        )
    return text


def cache_keyword(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` (the old name is deprecated, to be
    removed). Read from the causal LM's own forward: a PEFT or DDP wrapper's takes **kwargs and
    passes them on, so its signature would say "past_key_values" for a model that wants "cache"."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def eos_ids(model, tokenizer) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (chat models often end turns with both)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def generation_config(model, tokenizer, settings: SampleSettings):
    """A fresh GenerationConfig: only what we set (a model's own sampling defaults do not leak in)."""
    from transformers import GenerationConfig

    greedy = settings.temperature == 0
    kwargs = (
        {"do_sample": False}
        if greedy
        else {
            "do_sample": True,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": settings.top_k,
        }
    )
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids(model, tokenizer),
        **kwargs,
    )


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run the prompts (all but their last token) once into a fresh DynamicCache; returns the cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate computes them
    model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_keyword(model): cache},
    )
    return cache


@torch.no_grad()
class SampledTokenLogps:
    """A logits processor that records the sampler's log-prob of each token it samples:
    log softmax(logits / T) over the whole vocabulary, the distribution the learner scores the token
    under (online/step.py), before top-k/top-p truncation. It holds one (rows, vocab) step at a
    time: step t's distribution is read at step t + 1, where the token sampled from it is the last
    column of input_ids; `finish` reads the last step's.

    `recording_generation(config)` moves the temperature and truncation out of the config and
    behind this processor, in transformers' own order, so the samples are those of `config`."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(rows, T_new) log-probs of `new_tokens` (entries after a row's EOS are meaningless)."""
        if self.previous is not None and len(self.steps) < new_tokens.shape[1]:
            at = len(self.steps)
            self.steps.append(self.previous.gather(1, new_tokens[:, at : at + 1]).squeeze(1))
        self.previous = None
        steps, self.steps = self.steps, []
        return torch.stack(steps, dim=1) if steps else new_tokens.new_zeros(new_tokens.shape, dtype=torch.float32)


def recording_generation(config):
    """(config, processors, recorder): the same sampling as `config`, with SampledTokenLogps first
    and the warpers after it (transformers appends custom processors after its own, which would
    let the recorder see truncated scores)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    recorder = SampledTokenLogps(config.temperature)
    processors = [recorder]
    if config.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        processors.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        processors.append(TopPLogitsWarper(config.top_p))
    plain = copy.deepcopy(config)
    plain.temperature, plain.top_k, plain.top_p = 1.0, 0, 1.0
    return plain, LogitsProcessorList(processors), recorder


def generate_batch(
    model, input_ids, attention_mask, n: int, config, shared_prefill: bool = True, logits_processor=None
) -> torch.Tensor:
    """(B*n, T_new) new tokens for B left-padded prompts, each sampled n times (rows i*n .. i*n+n-1).

    Greedy decoding (do_sample off) gives n equal completions: it is decoded once and repeated.
    """
    width = input_ids.shape[1]
    if not config.do_sample and n > 1:
        return generate_batch(model, input_ids, attention_mask, 1, config, shared_prefill).repeat_interleave(n, dim=0)
    extra_processors = {} if logits_processor is None else {"logits_processor": logits_processor}
    if shared_prefill and width > 1:
        cache = prefill(model, input_ids[:, :-1], attention_mask[:, :-1])
        cache.batch_repeat_interleave(n)  # the prompt's keys/values, shared by its n samples
        extra = {cache_keyword(model): cache}
    else:
        extra = {}  # plain: like generate(num_return_sequences=n), n copies of each prompt prefilled
    out = model.generate(
        input_ids=input_ids.repeat_interleave(n, dim=0),
        attention_mask=attention_mask.repeat_interleave(n, dim=0),
        generation_config=config,
        **extra,
        **extra_processors,
    )
    return out[:, width:]


def split_completion(tokens: list[int], eos: set[int], pad_id: int) -> tuple[list[int], bool]:
    """Generated tokens up to and including the first EOS; padding after it dropped."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1], True
    return tokens, False


def prompt_rows(tokenizer, prompts: list, settings: SampleSettings) -> list[list[int]]:
    """Each prompt's token ids as sampling feeds them (rendered as training renders them, cut to
    the last max_prompt_length tokens)."""
    from prefopt.data.tokenize import PreferenceTokenizer

    tokenizing = PreferenceTokenizer(tokenizer, max_length=2)
    rows = []
    for prompt in prompts:
        ids = tokenizing.prompt_ids(prompt.prompt if isinstance(prompt, PromptExample) else prompt)[0]
        rows.append(ids[-settings.max_prompt_length :] if settings.max_prompt_length else ids)
    return rows


def batch_plan(rows: list[list[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in generate batches of similar lengths: longest first, equal lengths in input
    order. Left padding to a batch's longest prompt is then small, and the longest batch runs first
    (it fails at once if memory is short). Batch k is sampled under seed + k, so any batch can be
    sampled again alone (a resumed job) and give what it gave before."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def sample_batch(model, tokenizer, rows: list[list[int]], settings: SampleSettings, seed: int, stats=None):
    """The N samples of each of `rows` (one generate call), in the rows' order."""
    config = generation_config(model, tokenizer, settings)
    eos = set(config.eos_token_id)
    device = next(model.parameters()).device
    n = settings.num_samples
    started = time.perf_counter()
    torch.manual_seed(seed)  # reproducible, batch by batch
    input_ids, mask = left_pad(rows, tokenizer.pad_token_id, device)
    new = generate_batch(model, input_ids, mask, n, config, settings.shared_prefill).tolist()
    results = []
    for i, prompt_ids in enumerate(rows):
        kept = [split_completion(tokens, eos, tokenizer.pad_token_id) for tokens in new[i * n : (i + 1) * n]]
        ids = [k[0] for k in kept]
        finished = [k[1] for k in kept]
        texts = [tokenizer.decode(t[:-1] if f else t) for t, f in zip(ids, finished, strict=True)]
        results.append(Samples(prompt_ids, ids, texts, finished))
    if stats is not None:
        copies = 1 if settings.shared_prefill or settings.temperature == 0 else n
        stats.prefill_tokens += int(mask.sum()) * copies
        for group in results:
            stats.empty += sum(not text.strip() for text in group.completions)
            stats.completion_tokens += sum(map(len, group.completion_ids))
            stats.finished += sum(group.finished)
        stats.seconds += time.perf_counter() - started
        stats.prompts += len(rows)
        stats.completions += len(rows) * n
    return results


def sample_prompts(
    model, tokenizer, prompts: list, settings: SampleSettings, stats: SampleStats | None = None, progress: str = ""
) -> list[Samples]:
    """N completions for each prompt (text or messages, as training renders them), in prompt order;
    generated in batches of similar lengths (`batch_plan`). `progress`: a bar's label (a terminal
    shows it with its ETA; none when empty)."""
    from tqdm.auto import tqdm

    stats = stats if stats is not None else SampleStats()
    rows = prompt_rows(tokenizer, prompts, settings)
    results: list[Samples | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), unit="prompt", desc=progress, disable=None if progress else True)
    for k, batch in enumerate(batch_plan(rows, settings.batch_size)):
        groups = sample_batch(model, tokenizer, [rows[i] for i in batch], settings, settings.seed + k, stats)
        for i, group in zip(batch, groups, strict=True):
            results[i] = group
        bar.update(len(batch))
    bar.close()
    stats.plain_prompts += sum(isinstance(p.prompt if isinstance(p, PromptExample) else p, str) for p in prompts)
    return results


# -- scoring and the samples file -----------------------------------------------------------------


def score_samples(reward, prompts: list[PromptExample], samples: list[Samples]) -> tuple[list[list], int]:
    """Rewards per prompt (N each) from one call over all completions; and how many were unscorable."""
    flat_prompts, flat_completions, columns = [], [], {}
    names = sorted({name for p in prompts for name in p.columns})
    for prompt, group in zip(prompts, samples, strict=True):
        for text in group.completions:
            flat_prompts.append(prompt.prompt)
            flat_completions.append(text)
            for name in names:
                columns.setdefault(name, []).append(prompt.columns.get(name))
    scores = reward(flat_prompts, flat_completions, **columns)
    out, at = [], 0
    for group in samples:
        out.append(scores[at : at + len(group.completions)])
        at += len(group.completions)
    return out, sum(s is None for s in scores)


def sample_records(prompts: list[PromptExample], samples: list[Samples], rewards: list[list] | None) -> list[dict]:
    """One JSON object per prompt: its extra columns, then prompt, completions, ids, finished, rewards.

    `prompt_ids` are the prompt's tokens as the model saw them (rendered, and cut to
    max_prompt_length when that was set); with `completion_ids` they let training use the
    sampled tokens themselves, after checking that its tokenizer renders the same prompt ids.
    """
    records = []
    for i, (prompt, group) in enumerate(zip(prompts, samples, strict=True)):
        record = dict(prompt.columns)
        record.update(
            prompt=prompt.prompt,
            prompt_ids=group.prompt_ids,
            completions=group.completions,
            completion_ids=group.completion_ids,
            finished=group.finished,
        )
        if rewards is not None:
            record["rewards"] = rewards[i]
        records.append(record)
    return records


def write_jsonl(path: str | Path, records: list[dict], overwrite: bool = False) -> Path:
    """Write atomically; an existing file is replaced only with overwrite=True."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PrefoptError(f"{path} exists; choose another --output or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(staging, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(staging, path)
    return path
