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
from dataclasses import dataclass, field
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
    recording_generation,
    score_samples,
    split_completion,
)
from prefopt.online.dynamic import fill, informative
from prefopt.online.mismatch import in_batch_order, mismatch_metrics, mismatch_warning
from prefopt.online.reuse import ReusePlan, RolloutWindow, reuse_plan
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


@dataclass
class Rollout:
    """One mini-batch of sampled, scored completions as the loss reads them; with rollout reuse it
    serves num_iterations passes (online/reuse.py), keeping what the later passes reuse."""

    prompt_indices: list[int]  # every prompt of the slice (dataset indices)
    groups: list = field(default_factory=list)  # [(prompt ids, [completion ids, ...])] that reach the loss
    rows: list = field(default_factory=list)  # rows[i][j]: the logical row of completion j of group i
    rewards: list = field(default_factory=list)
    group_of: list = field(default_factory=list)
    baseline_of: list = field(default_factory=list)
    indices: list = field(default_factory=list)  # the prompts that reach the loss
    finished: list = field(default_factory=list)  # per completion: ended with EOS (not cut at max_new_tokens)
    metrics: dict = field(default_factory=dict)  # of the sampling: unscorable, generation_s, ...
    skip: bool = False  # nothing to learn from in some process: all processes skip it together
    old_token_logps: torch.Tensor | None = None  # pi_old of each completion token
    old_token_values: torch.Tensor | None = None  # PPO: V_old
    reference_token_logps: torch.Tensor | None = None
    sampler_token_logps: torch.Tensor | None = None  # the sampler's own log-prob of each token
    batch: SequenceBatch | None = None  # the layout (rebuilt from groups after a resume)

    TENSORS = ("old_token_logps", "old_token_values", "reference_token_logps", "sampler_token_logps")

    def state(self) -> dict:
        plain = {name: value for name, value in vars(self).items() if name != "batch" and name not in self.TENSORS}
        plain["groups"] = [[list(prompt), [list(c) for c in completions]] for prompt, completions in self.groups]
        for name in self.TENSORS:
            value = getattr(self, name)
            plain[name] = None if value is None else value.detach().cpu()
        return plain

    @classmethod
    def from_state(cls, state: dict, device) -> Rollout:
        values = dict(state)
        values["groups"] = [(prompt, completions) for prompt, completions in values["groups"]]
        for name in cls.TENSORS:
            if values[name] is not None:
                values[name] = values[name].to(device)
        return cls(**values)


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
        reuse: ReusePlan | None = None,
        on_policy_slices: int = 1,
        importance_cap: float | None = None,
        mismatch_threshold: float = 0.05,
        mask_truncated: bool = False,
        dynamic_rounds: int = 0,
    ):
        self.window = RolloutWindow(reuse or ReusePlan())  # rollout reuse (online/reuse.py)
        self.on_policy_slices = on_policy_slices  # slices trained in the step that samples them (grad_accum)
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
        self._warned_mismatch = False
        self.mask_truncated = mask_truncated
        self.dynamic_rounds = dynamic_rounds  # DAPO's dynamic sampling: extra rounds allowed (0: off)
        self.prompt_pool: list[PromptItem] = []  # where extra prompts come from (the trainer sets it)
        self.importance_cap = importance_cap  # TIS: cap of the per-token weight pi_old / pi_sampler (None: off)
        self.mismatch_threshold = mismatch_threshold  # mean |logp_learner - logp_sampler| that warns

    @torch.no_grad()
    def sample(self, model, items: list[PromptItem], settings: SampleSettings) -> list[Samples]:
        """`settings.num_samples` completions per prompt from `model` as it is now (eval mode: no
        dropout), with the sampler's log-prob of each token when it samples (not greedy)."""
        model = getattr(model, "module", model)
        config = generation_config(model, self.tokenizer, settings)
        eos = set(config.eos_token_id)
        device = next(model.parameters()).device
        input_ids, mask = left_pad([item.prompt_ids for item in items], self.tokenizer.pad_token_id, device)
        processors = recorder = None
        if config.do_sample:
            config, processors, recorder = recording_generation(config)
        was_training = model.training
        model.eval()
        try:
            generated = generate_batch(model, input_ids, mask, settings.num_samples, config, True, processors)
        finally:
            model.train(was_training)
        logps = recorder.finish(generated) if recorder is not None else None
        new = generated.tolist()
        n, out = settings.num_samples, []
        for i, item in enumerate(items):
            kept = [split_completion(tokens, eos, self.tokenizer.pad_token_id) for tokens in new[i * n : (i + 1) * n]]
            ids = [k[0] for k in kept]
            texts = [self.tokenizer.decode(t[:-1] if f else t) for t, (_, f) in zip(ids, kept, strict=True)]
            sampled = None if logps is None else [logps[i * n + j, : len(t)] for j, t in enumerate(ids)]
            out.append(Samples(item.prompt_ids, ids, texts, [k[1] for k in kept], sampled))
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
        prompts that reached the loss and num_tokens counts the forward's tokens.

        With rollout reuse (online/reuse.py) `items` is a whole generation batch: the window's first
        micro-batch samples it, and every micro-batch trains on its own slice of it."""
        if not self.window.plan.active:  # one update per sampled batch
            (rollout,) = self.collect(model, items, 1)
            return self.learn(model, rollout, loss_fn, loss_args, reference, first_pass=True)
        window = self.window
        if window.needs_sampling():
            window.slices = self.collect(model, items, window.plan.steps_per_generation)
        position = window.position()
        window.calls += 1
        steps = window.plan.steps_per_generation
        rollout = window.slices[position % steps]
        return self.learn(model, rollout, loss_fn, loss_args, reference, first_pass=position < steps)

    def collect(self, model, items: list[PromptItem], num_slices: int) -> list[Rollout]:
        """Sample and score `items` at once; split them by prompt into `num_slices` Rollouts laid
        out for the loss. Slices first trained after an optimizer step get pi_old now."""
        started = time.perf_counter()
        prompts = [item.example for item in items]
        samples, scores, baselines, components = self._sample_and_score(model, items)
        if self.dynamic_rounds:  # DAPO: replace equal-reward groups with newly drawn prompts
            items, samples, scores, baselines, components = self._refill(
                model, items, samples, scores, baselines, components
            )
            prompts = [item.example for item in items]
        generation_s = time.perf_counter() - started
        texts = [text for group in samples for text in group.completions]
        self._warn_if_empty(sum(not text.strip() for text in texts), len(texts), prompts)
        size = -(-len(items) // num_slices)
        device = next(model.parameters()).device
        rollouts = []
        for start in range(0, len(items), size):
            part = range(start, min(start + size, len(items)))
            rollout = self._rollout(items, samples, scores, baselines, part, device)
            slice_texts = [text for i in part for text in samples[i].completions]
            rollout.metrics = {
                "unscorable": float(sum(s is None for i in part for s in scores[i])),
                "generation_s": generation_s if start == 0 else 0.0,  # per micro-batch: the window's mean
                "empty_completions": sum(not text.strip() for text in slice_texts) / len(slice_texts),
                **components,
            }
            if len(rollouts) >= self.on_policy_slices and not rollout.skip:
                self._keep_old(model, rollout)  # trained after an update: pi_old is the sampler as it is now
            rollouts.append(rollout)
        return rollouts

    def _sample_and_score(self, model, items: list[PromptItem]):
        """(samples, scores, greedy baselines, reward components) of `items`."""
        prompts = [item.example for item in items]
        samples = self.sample(model, items, self.settings)
        scores, _ = score_samples(self.reward, prompts, samples)
        components = component_means(self.reward)  # reward/NAME of each of several rewards
        if self.overlong:
            scores, components["overlong_penalty"] = self._shape(samples, scores)
        baselines = [None] * len(items)
        if self.greedy_baseline:
            greedy = SampleSettings(num_samples=1, max_new_tokens=self.settings.max_new_tokens, temperature=0)
            greedy_scores, _ = score_samples(self.reward, prompts, self.sample(model, items, greedy))
            baselines = [group[0] for group in greedy_scores]
        return samples, scores, baselines, components

    def _refill(self, model, items, samples, scores, baselines, components):
        """Dynamic sampling (online/dynamic.py). Every process samples the same number of rounds (a
        sharded model generates together), as long as any of them still lacks informative groups."""
        candidates = list(zip(items, samples, scores, baselines, strict=True))
        device = next(model.parameters()).device
        rounds = 0
        while rounds < self.dynamic_rounds:
            missing = len(items) - sum(informative(c[2]) for c in candidates)
            if not any_process(missing > 0, device):
                break
            picks = torch.randint(len(self.prompt_pool), (max(missing, 1),)).tolist()
            extra = [self.prompt_pool[i] for i in picks]
            new_samples, new_scores, new_baselines, _ = self._sample_and_score(model, extra)
            if missing > 0:
                candidates += list(zip(extra, new_samples, new_scores, new_baselines, strict=True))
            rounds += 1
        chosen = fill(candidates, len(items))
        components = {
            **components,
            "dynamic_sampling/rounds": float(rounds),
            "dynamic_sampling/informative": sum(informative(c[2]) for c in chosen) / len(chosen),
        }
        items, samples, scores, baselines = (list(column) for column in zip(*chosen, strict=True))
        return items, samples, scores, baselines, components

    def _rollout(self, items, samples, scores, baselines, part, device) -> Rollout:
        rollout = Rollout(prompt_indices=[items[i].index for i in part])
        sampled = []  # the sampler's log-probs, completion by completion in row order
        for i in part:
            kept = [j for j, s in enumerate(scores[i]) if s is not None]
            if not kept or (self.greedy_baseline and baselines[i] is None):
                continue
            rollout.groups.append((samples[i].prompt_ids, [samples[i].completion_ids[j] for j in kept]))
            rollout.rows.append(list(range(len(rollout.rewards), len(rollout.rewards) + len(kept))))
            rollout.rewards += [scores[i][j] for j in kept]
            rollout.group_of += [len(rollout.groups) - 1] * len(kept)
            rollout.baseline_of += [baselines[i]] * len(kept)
            rollout.indices.append(items[i].index)
            rollout.finished += [samples[i].finished[j] for j in kept]
            if samples[i].token_logps is not None:
                sampled += [samples[i].token_logps[j] for j in kept]
        # Nothing to learn from in some process: every process skips this micro-batch together. A
        # process that skipped alone would run no forward, and under DDP the others would wait in
        # the gradient all-reduce for it (DESIGN §7). No gradient this micro-batch, anywhere.
        rollout.skip = any_process(not rollout.rewards, device)
        if not rollout.skip:
            rollout.batch = self.layout(rollout, device)
            if sampled:
                rollout.sampler_token_logps = in_batch_order(rollout.batch, sampled)
        return rollout

    def layout(self, rollout: Rollout, device) -> SequenceBatch:
        """The rollout's completions after their prompts, as one forward reads them."""
        pad = self.tokenizer.pad_token_id
        shared = shared_prefix_batch(rollout.groups, rollout.rows, pad, self.pack) if self.share_prefix else None
        batch = (shared or plain_batch(rollout.groups, rollout.rows, pad)).to(device)
        batch.example_indices, batch.paired = rollout.indices, False
        return batch

    def _score(self, model, batch: SequenceBatch):
        """(token log-probs, states) of the batch's completion tokens under `model` as it is now, at
        the sampling temperature: softmax(logits / T), as they were sampled (TRL does the same)."""
        states = completion_states(model, batch, self.use_logits)
        head = torch.nn.Identity() if self.use_logits else output_head(model)
        return completion_token_logps(head, states, self.chunk_size, self.temperature), states

    @property
    def temperature(self) -> float:
        return self.settings.temperature or 1.0

    @torch.no_grad()
    def _keep_old(self, model, rollout: Rollout) -> None:
        rollout.old_token_logps, states = self._score(model, rollout.batch)
        if self.critic is not None:
            rollout.old_token_values = self.critic(states.hidden)

    def learn(self, model, rollout: Rollout, loss_fn, loss_args: dict, reference, first_pass: bool):
        """(loss, metrics, batch) of one pass over a rollout. Values that a later pass reuses (the
        reference's log-probs; pi_old and V_old from the pass before any update) are kept on it."""
        metrics = dict(rollout.metrics)
        if not first_pass:
            metrics["generation_s"] = 0.0
        if rollout.skip:
            zero = torch.zeros((), device=next(model.parameters()).device, requires_grad=True)
            return zero, metrics, SimpleNamespace(example_indices=rollout.prompt_indices, num_tokens=0)
        batch = rollout.batch
        reused = self.window.plan.num_iterations > 1  # another pass will read what this one computes
        ref_tokens = rollout.reference_token_logps
        if ref_tokens is None and reference is not None:
            ref_tokens = reference.token_logps(model, batch, self.temperature)
            if reused:
                rollout.reference_token_logps = ref_tokens.detach()
        token_logps, states = self._score(model, batch)
        inputs = _loss_inputs(batch, token_logps, ref_tokens, rollout, self.settings)
        inputs.old_token_logps = rollout.old_token_logps
        if self.critic is not None:  # V(s_t) from the state that predicts token t (the same forward)
            inputs.token_values = self.critic(states.hidden)
            inputs.old_token_values = rollout.old_token_values
        inputs.sampler_token_logps, inputs.importance_cap = rollout.sampler_token_logps, self.importance_cap
        if self.mask_truncated:  # DAPO: cut completions leave the loss, keep their place in the advantages
            inputs.completion_mask = torch.tensor(rollout.finished, device=token_logps.device, dtype=torch.float32)
        if first_pass and rollout.sampler_token_logps is not None:  # the learner at the sampler's weights
            old = token_logps.detach() if rollout.old_token_logps is None else rollout.old_token_logps
            rollout.metrics.update(self._mismatch(old, rollout.sampler_token_logps))
            metrics.update(rollout.metrics)
        out = loss_fn(inputs, **loss_args)
        if reused and rollout.old_token_logps is None:  # no update yet since sampling: this is pi_old
            rollout.old_token_logps = token_logps.detach()
            if self.critic is not None:
                rollout.old_token_values = inputs.token_values.detach()
        metrics.update({name: float(value) for name, value in out.metrics.items()})
        return out.loss, metrics, batch

    def _mismatch(self, learner: torch.Tensor, sampler: torch.Tensor) -> dict:
        """The monitor (online/mismatch.py), with its warning said once per run."""
        values = mismatch_metrics(learner, sampler)
        if not self._warned_mismatch and values["mismatch/mean_abs_logp_diff"] > self.mismatch_threshold:
            self._warned_mismatch = True
            print(f"prefopt: warning: {mismatch_warning(values, self.mismatch_threshold)}")
        return values

    # -- checkpoints: a half-used window, for an exact resume ---------------------------------

    def window_state(self) -> dict | None:
        """What a checkpoint keeps of the window being reused (None when none is open)."""
        return self.window.state() if self.window.open() else None

    def restore_window(self, state: dict | None, calls: int, device) -> None:
        """On --resume: continue the window a checkpoint kept, or start at `calls` micro-batches."""
        self.window.calls = state["calls"] if state else calls
        self.window.slices = None
        if state:
            slices = [Rollout.from_state(s, device) for s in state["slices"]]
            for rollout in slices:
                rollout.batch = None if rollout.skip else self.layout(rollout, device)
            self.window.slices = slices


def _loss_inputs(batch, token_logps, ref_tokens, rollout: Rollout, settings) -> LossInputs:
    rewards, group_of, baseline_of = rollout.rewards, rollout.group_of, rollout.baseline_of
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
        reuse=reuse_plan(config.num_iterations, config.steps_per_generation, config.grad_accum),
        on_policy_slices=config.grad_accum,
        importance_cap=config.importance_sampling_cap,
        mismatch_threshold=config.mismatch_threshold,
        mask_truncated=config.mask_truncated_completions,
        dynamic_rounds=config.dynamic_sampling_rounds,
    )
