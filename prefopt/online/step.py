"""The rollout step: what the trainer does each step for a loss that declares `needs_rollouts`.

For a micro-batch of prompts: sample G completions per prompt from the current policy (the
prompt prefilled once, its KV cache shared: prefopt.models.rollout), and one greedy completion when the
loss declares `needs_greedy_baseline` (ReMax); score them with the reward; lay the G completions
of a prompt out in one sequence after it (the shared-prefix layout with G branches,
prefopt.data.collate.shared_prefix_batch) or one row each; take the policy's (and the
reference's) log-prob of every completion token with the chunked code of prefopt.models.logps, and,
when the loss declares `needs_value_model` (PPO), the critic's value of the state before each
token from the same forward (prefopt.online.critic); hand all of it to the loss as LossInputs. Sampling uses the global torch RNG, which transformers
saves in each checkpoint and restores on --resume, so a resumed run draws the same samples.

Unscorable completions (the reward returned None) are dropped before the loss and counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from prefopt.data.collate import SequenceBatch, shared_prefix_batch
from prefopt.data.formats import PromptExample
from prefopt.distributed import any_process
from prefopt.errors import PrefoptError
from prefopt.losses import LossInputs
from prefopt.models.logps import completion_states, completion_token_logps, output_head
from prefopt.models.rollout import (
    Samples,
    SampleSettings,
    empty_completions_warning,
    generate_batch,
    generation_config,
    left_pad,
    score_samples,
    split_completion,
)
from prefopt.online.shaping import overlong_penalty
from prefopt.rewards.combined import component_means


@dataclass
class PromptItem:
    """A tokenized prompt of the training set (the trainer's dataset item for rollout losses)."""

    prompt_ids: list[int]
    example: PromptExample
    index: int

    @property
    def where(self) -> str:
        return self.example.where

    @property
    def length(self) -> int:
        return len(self.prompt_ids)


def tokenize_prompts(examples: list[PromptExample], tokenizer, max_prompt_length: int | None) -> list[PromptItem]:
    """Prompt ids as sampling renders them (chat template with the generation prompt); the end kept."""
    from prefopt.data.tokenize import PreferenceTokenizer

    tokenizing = PreferenceTokenizer(tokenizer, max_length=2)
    items = []
    for index, example in enumerate(examples):
        ids = tokenizing.prompt_ids(example.prompt)[0]
        items.append(PromptItem(ids[-max_prompt_length:] if max_prompt_length else ids, example, index))
    return items


class PromptCollator:
    """Prompts travel to compute_loss as they are: the completions are sampled there."""

    def __call__(self, items: list[PromptItem]) -> dict:
        return {"prompts": list(items)}


def plain_batch(groups: list, rows: list, pad_id: int) -> SequenceBatch:
    """One right-padded row per completion, [prompt; completion] (the layout without prompt sharing)."""
    sequences = [(p, c, rows[i][j]) for i, (p, completions) in enumerate(groups) for j, c in enumerate(completions)]
    width = max(len(p) + len(c) for p, c, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    sources, tokens, logical = [], [], []
    for at, (prompt, completion, row) in enumerate(sequences):
        n, m = len(prompt), len(completion)
        input_ids[at, : n + m] = torch.tensor(prompt + completion)
        attention[at, : n + m] = 1
        sources += range(at * width + n - 1, at * width + n + m - 1)  # position t predicts token t + 1
        tokens += completion
        logical += [row] * m
    empty = torch.zeros(0, dtype=torch.long)
    return SequenceBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=None,
        predict_from=torch.tensor(sources),
        predict_token=torch.tensor(tokens),
        predict_row=torch.tensor(logical),
        num_rows=len(sequences),
        chosen_rows=empty,
        rejected_rows=empty,
        kl_rows=empty,
        num_tokens=int(attention.sum()),
    )


class Rollouts:
    """Serves `needs_rollouts` (and `needs_greedy_baseline`) for the trainer: see the module's docstring."""

    def __init__(
        self,
        tokenizer,
        reward,
        settings: SampleSettings,
        *,
        greedy_baseline: bool = False,
        share_prefix: bool = True,
        pack: bool = True,
        chunk_size: int = 1024,
        use_logits: bool = False,
        critic=None,
        overlong: tuple[int, float] | None = None,
    ):
        self.overlong = overlong  # (buffer, penalty): DAPO's overlong reward shaping (online/shaping.py)
        self.tokenizer = tokenizer
        self.critic = critic  # prefopt.online.critic.ValueHead when the loss declares needs_value_model
        self.reward = reward
        self.settings = settings
        self.greedy_baseline = greedy_baseline
        self.share_prefix = share_prefix
        self.pack = pack
        self.chunk_size = chunk_size
        self.use_logits = use_logits
        self._warned_empty = False  # the empty-completions warning is said once per run

    @torch.no_grad()
    def sample(self, model, items: list[PromptItem], settings: SampleSettings) -> list[Samples]:
        """`settings.num_samples` completions per prompt from `model` as it is now (eval mode: no dropout)."""
        model = getattr(model, "module", model)
        config = generation_config(model, self.tokenizer, settings)
        eos = set(config.eos_token_id)
        device = next(model.parameters()).device
        input_ids, mask = left_pad([item.prompt_ids for item in items], self.tokenizer.pad_token_id, device)
        was_training = model.training
        model.eval()
        try:
            new = generate_batch(model, input_ids, mask, settings.num_samples, config).tolist()
        finally:
            model.train(was_training)
        n, out = settings.num_samples, []
        for i, item in enumerate(items):
            kept = [split_completion(tokens, eos, self.tokenizer.pad_token_id) for tokens in new[i * n : (i + 1) * n]]
            ids = [k[0] for k in kept]
            texts = [self.tokenizer.decode(t[:-1] if f else t) for t, (_, f) in zip(ids, kept, strict=True)]
            out.append(Samples(item.prompt_ids, ids, texts, [k[1] for k in kept]))
        return out

    def _shape(self, samples: list[Samples], scores: list[list]) -> tuple[list[list], float]:
        """Scores with DAPO's overlong penalty added (unscorable ones stay None); and the mean penalty."""
        buffer, penalty = self.overlong
        shaped, penalties = [], []
        for group, group_scores in zip(samples, scores, strict=True):
            row = []
            for ids, score in zip(group.completion_ids, group_scores, strict=True):
                cost = overlong_penalty(len(ids), self.settings.max_new_tokens, buffer, penalty)
                penalties.append(cost)
                row.append(None if score is None else score + cost)
            shaped.append(row)
        return shaped, sum(penalties) / max(len(penalties), 1)

    def _warn_if_empty(self, empty: int, total: int, prompts: list) -> None:
        """Once per run: most completions of a micro-batch were empty (and the likely cause)."""
        if self._warned_empty:
            return
        plain = all(isinstance(p.prompt, str) for p in prompts)
        warning = empty_completions_warning(empty, total, plain, bool(getattr(self.tokenizer, "chat_template", None)))
        if warning:
            self._warned_empty = True
            print(f"prefopt: warning: {warning}")

    def __call__(self, model, items: list[PromptItem], loss_fn, loss_args: dict, reference=None):
        """(loss, metrics, batch) for one micro-batch of prompts; the batch's example_indices are the
        prompts that reached the loss and num_tokens counts the forward's tokens."""
        started = time.perf_counter()
        prompts = [item.example for item in items]
        samples = self.sample(model, items, self.settings)
        scores, unscorable = score_samples(self.reward, prompts, samples)
        components = component_means(self.reward)  # reward/NAME of each of several rewards
        if self.overlong:
            scores, components["overlong_penalty"] = self._shape(samples, scores)
        baselines = [None] * len(items)
        if self.greedy_baseline:
            greedy = SampleSettings(num_samples=1, max_new_tokens=self.settings.max_new_tokens, temperature=0)
            greedy_scores, _ = score_samples(self.reward, prompts, self.sample(model, items, greedy))
            baselines = [group[0] for group in greedy_scores]
        generation_s = time.perf_counter() - started
        groups, rows, rewards, group_of, baseline_of, indices = [], [], [], [], [], []
        for i, (group, group_scores) in enumerate(zip(samples, scores, strict=True)):
            kept = [j for j, s in enumerate(group_scores) if s is not None]
            if not kept or (self.greedy_baseline and baselines[i] is None):
                continue
            groups.append((group.prompt_ids, [group.completion_ids[j] for j in kept]))
            rows.append(list(range(len(rewards), len(rewards) + len(kept))))
            rewards += [group_scores[j] for j in kept]
            group_of += [len(groups) - 1] * len(kept)
            baseline_of += [baselines[i]] * len(kept)
            indices.append(items[i].index)
        device = next(model.parameters()).device
        texts = [text for group in samples for text in group.completions]
        empty = sum(not text.strip() for text in texts)
        metrics = {
            "unscorable": float(unscorable),
            "generation_s": generation_s,
            "empty_completions": empty / len(texts),
            **components,
        }
        self._warn_if_empty(empty, len(texts), prompts)
        # Nothing to learn from in some process: every process skips this micro-batch together. A
        # process that skipped alone would run no forward, and under DDP the others would wait in
        # the gradient all-reduce for it (DESIGN §7). No gradient this micro-batch, anywhere.
        if any_process(not rewards, device):
            zero = torch.zeros((), device=device, requires_grad=True)
            return zero, metrics, SimpleNamespace(example_indices=[item.index for item in items], num_tokens=0)
        layout = (
            shared_prefix_batch(groups, rows, self.tokenizer.pad_token_id, self.pack) if self.share_prefix else None
        )
        batch = (layout or plain_batch(groups, rows, self.tokenizer.pad_token_id)).to(device)
        batch.example_indices, batch.paired = indices, False
        # scored under the distribution they were sampled from: softmax(logits / T) (TRL does the same)
        temperature = self.settings.temperature or 1.0
        ref_tokens = reference.token_logps(model, batch, temperature) if reference is not None else None
        states = completion_states(model, batch, self.use_logits)
        head = torch.nn.Identity() if self.use_logits else output_head(model)
        token_logps = completion_token_logps(head, states, self.chunk_size, temperature)
        inputs = _loss_inputs(batch, token_logps, ref_tokens, rewards, group_of, baseline_of, self.settings)
        if self.critic is not None:  # V(s_t) from the state that predicts token t (the same forward)
            inputs.token_values = self.critic(states.hidden)
        out = loss_fn(inputs, **loss_args)
        metrics.update({name: float(value) for name, value in out.metrics.items()})
        return out.loss, metrics, batch


def _loss_inputs(batch, token_logps, ref_tokens, rewards, group_of, baseline_of, settings) -> LossInputs:
    rows, n = batch.predict_row, batch.num_rows
    device = token_logps.device

    def per_row(values):
        return torch.zeros(n, device=device, dtype=torch.float32).index_add(0, rows, values.float())

    logps, lengths = per_row(token_logps), per_row(torch.ones_like(token_logps))
    ref_sums = per_row(ref_tokens) if ref_tokens is not None else None
    return LossInputs(
        policy_chosen_logps=logps,
        policy_rejected_logps=logps[:0],
        chosen_lengths=lengths,
        rejected_lengths=lengths[:0],
        reference_chosen_logps=ref_sums,
        reference_rejected_logps=ref_sums[:0] if ref_sums is not None else None,
        token_logps=token_logps,
        reference_token_logps=ref_tokens,
        token_rows=rows,
        rewards=torch.tensor(rewards, device=device, dtype=torch.float32),
        groups=torch.tensor(group_of, device=device),
        baseline_rewards=torch.tensor(baseline_of, device=device, dtype=torch.float32)
        if baseline_of and baseline_of[0] is not None
        else None,
        max_completion_length=settings.max_new_tokens,
    )


def make_rollouts(config, spec, tokenizer, share_prefix: bool, use_logits: bool, critic=None) -> Rollouts:
    """The Rollouts a TrainConfig asks for, with its reward loaded (user reward modules imported first);
    `critic` (a ValueHead) when the loss declares needs_value_model."""
    from prefopt.rewards import configure_rewards, import_reward_module

    for module in config.reward_module:
        import_reward_module(module)
    if config.overlong_buffer and config.overlong_buffer >= config.max_new_tokens:
        raise PrefoptError(
            f"overlong_buffer ({config.overlong_buffer}) must be below max_new_tokens ({config.max_new_tokens}): "
            "the penalty covers the last overlong_buffer tokens of the budget"
        )
    settings = SampleSettings(
        num_samples=config.num_generations,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
    )
    return Rollouts(
        tokenizer,
        configure_rewards(config.reward, config.reward_weights, config.reward_args),
        settings,
        greedy_baseline=spec.needs_greedy_baseline,
        share_prefix=share_prefix,
        pack=config.pack,
        chunk_size=config.chunk_size,
        use_logits=use_logits,
        critic=critic,
        overlong=(config.overlong_buffer, config.overlong_penalty) if config.overlong_buffer else None,
    )
