"""The one trainer: transformers.Trainer plus what preference losses need.

transformers gives the loop, gradient accumulation, schedulers, mixed precision,
checkpoints and exact resume, logging integrations and multi-GPU through accelerate.
This class adds one thing: `batch_loss`, which computes exactly what the loss declares
it needs (reference log-probs, token-level KL, mismatched pairs; for policy-gradient losses
the rollouts, and PPO's value head trained beside the policy; for a reward model, one score
per sequence from a sequence classifier) and nothing else. It never looks at the loss's name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import rotate_checkpoints

from prefopt.compat import LengthGroupedSampler, TrainerHooks
from prefopt.data.cache import item_lengths
from prefopt.data.collate import PreferenceCollator, SequenceBatch
from prefopt.distributed import any_process
from prefopt.errors import PrefoptError
from prefopt.losses import LossInputs
from prefopt.models.logps import score_model, weight_is_whole
from prefopt.online.critic import VALUE_HEAD_FILE

# Written into each checkpoint: prefopt's own state that transformers does not keep.
PREFOPT_STATE = "prefopt_state.json"


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class DictCollator:
    """transformers.Trainer moves dict batches to the device; SequenceBatch travels as its fields."""

    def __init__(self, collator: PreferenceCollator):
        self.collator = collator

    def __call__(self, examples: list) -> dict:
        return vars(self.collator(examples))


@dataclass
class PreferenceArguments(TrainingArguments):
    """transformers' TrainingArguments with warm-up as a fraction of the run.

    transformers 5 has only `warmup_steps`, read as a fraction when below 1 and as a count
    otherwise, so 1.0 would mean one step. `warmup_ratio` is always a fraction (0..1).
    """

    warmup_ratio: float = 0.0

    def get_warmup_steps(self, num_training_steps: int) -> int:
        return math.ceil(num_training_steps * self.warmup_ratio)


def score_head(model) -> torch.nn.Module:
    """The `score` head of a (possibly PEFT- or DDP-wrapped) sequence classifier."""
    inner = getattr(model, "module", model)  # DDP / DataParallel
    if hasattr(inner, "get_base_model"):  # PEFT: the head is a ModulesToSaveWrapper around the trained copy
        inner = inner.get_base_model()
    head = getattr(inner, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise PrefoptError(
            f"{type(inner).__name__} has no `score` head: a reward-model loss needs a "
            "...ForSequenceClassification model whose head is called `score` (Llama, Qwen, Mistral, GPT-2, ...)"
        )
    return head


def sequence_scores(model, batch: SequenceBatch) -> torch.Tensor:
    """(rows,) a sequence classifier's score of each row, read at the row's last real token.

    The model runs its own forward (so DDP/PEFT wrappers see a normal call); its `score` head is
    applied at every position there, and that output is taken from a hook and pooled at the
    rightmost position the attention mask keeps. The model's own pooled logits are not used: they
    sit at the last token that is not `pad_token_id`, which skips the closing EOS when pad == eos
    (TRL #937, transformers #35352). The `reward_model` reward reads the same position.
    """
    mask = batch.attention_mask
    if mask.dim() != 2 or batch.position_ids is not None:
        raise PrefoptError(
            "a sequence classifier scores one sequence per row: the shared-prefix layout cannot serve it"
        )
    outputs = []
    hook = score_head(model).register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        model(input_ids=batch.input_ids, attention_mask=mask, use_cache=False)
    finally:
        hook.remove()
    per_position = outputs[-1][..., 0]  # (S, T): num_labels == 1
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * (mask != 0)).argmax(dim=1)  # the rightmost real token (right or left padding)
    return per_position[torch.arange(len(last), device=last.device), last].float()


class NonFiniteError(PrefoptError):
    """A loss or gradient became NaN/inf; the message names the step and the examples."""


def _detached(metrics: dict) -> dict:
    """A loss's metrics as they are (0-d tensors stay on the device, detached): converting each to a
    float would wait for the device once per metric and micro-batch; `window_means` converts them
    all together when a step is logged."""
    return {name: value.detach() if torch.is_tensor(value) else float(value) for name, value in metrics.items()}


def window_means(window: dict[str, list]) -> dict[str, float]:
    """The mean of each metric over the logging window, with one device-to-host copy for all."""
    names = [name for name, values in window.items() if values]
    if not names:
        return {}
    tensors = [v for name in names for v in window[name] if torch.is_tensor(v)]
    device = tensors[0].device if tensors else "cpu"
    means = torch.stack(
        [
            torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in window[name]]).mean()
            for name in names
        ]
    )
    return dict(zip(names, means.tolist(), strict=True))


class PreferenceTrainer(TrainerHooks):
    def __init__(
        self,
        *args,
        loss_fn,
        loss_args: dict,
        reference=None,
        rollouts=None,
        critic=None,
        value_learning_rate: float | None = None,
        chunk_size: int = 1024,
        use_logits: bool = False,
        group_by_length: bool = False,
        skip_nonfinite: int = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        prepare = getattr(reference, "prepare", None)
        if prepare is not None:  # a frozen copy goes where the policy trains (device, DeepSpeed engine)
            prepare(self)
        if critic is not None:  # built on the loaded model's device, before transformers moved the model
            critic.to(self.args.device)
        self.loss_fn = loss_fn
        self.spec = loss_fn.spec
        self.loss_args = loss_args
        self.reference = reference
        self.rollouts = rollouts  # prefopt.online.step.Rollouts when the loss declares needs_rollouts
        if rollouts is not None and self.train_dataset is not None:
            rollouts.prompt_pool = self.train_dataset.items  # dynamic sampling draws extra prompts here
        self.critic = critic  # prefopt.online.critic.ValueHead when the loss declares needs_value_model
        self.value_learning_rate = value_learning_rate  # its peak lr (None: the policy's)
        self.chunk_size = chunk_size
        self.use_logits = use_logits
        self.group_by_length = group_by_length
        self.skip_nonfinite = skip_nonfinite  # how many bad batches may still be skipped
        self.skipped_batches: list[str] = []
        self.last_example_indices: list[int] = []
        self.step_grad_norm = None  # set by record_grad_norm each optimizer step
        # Our loss is a mean over each micro-batch: the Trainer must divide by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self._window: dict[str, list[float]] = defaultdict(list)
        self._window_tokens = 0
        self._window_start = None
        self.train_start = None
        self._evaluations: dict[tuple[str, int], dict] = {}  # (prefix, step) -> results
        self.precision_record: dict | None = None  # prefopt.models.precision.precision_record, set by run.py

    # -- the loss ------------------------------------------------------------------------

    def batch_loss(self, model, batch: SequenceBatch):
        """(loss, metrics) for one batch, computing only what the loss declared it needs."""
        spec = self.spec
        if spec.needs_sequence_scores:  # a reward model: one score per sequence, no log-probs
            return self.score_loss(model, batch)
        ref_logps = ref_states = ref_head = None
        if spec.needs_reference:
            ref_logps, ref_states, ref_head = self.reference(model, batch, keep_states=spec.needs_token_kl)
        (logps, lengths, kl), _, _ = score_model(model, batch, self.use_logits, self.chunk_size, ref_head, ref_states)
        c, r, k = batch.chosen_rows, batch.rejected_rows, batch.kl_rows
        policy_kl = reference_kl = None
        if spec.needs_kl_pairs:
            policy_kl, reference_kl = logps[k], ref_logps[k]
            if self.args.world_size > 1:
                # KTO's reference point is a statistic of the batch, without gradient (Eq. 8: z is
                # detached): over the whole batch of all processes, as one process with their
                # examples would compute it (TRL gathers it too), not over this process's share.
                policy_kl, reference_kl = self.across_processes(policy_kl.detach()), self.across_processes(reference_kl)
        inputs = LossInputs(
            policy_chosen_logps=logps[c],
            policy_rejected_logps=logps[r],
            chosen_lengths=lengths[c],
            rejected_lengths=lengths[r],
            reference_chosen_logps=ref_logps[c] if ref_logps is not None else None,
            reference_rejected_logps=ref_logps[r] if ref_logps is not None else None,
            chosen_kl=kl[c] if kl is not None else None,
            rejected_kl=kl[r] if kl is not None else None,
            policy_kl_logps=policy_kl,
            reference_kl_logps=reference_kl,
        )
        out = self.loss_fn(inputs, **self.loss_args)
        metrics = _detached(out.metrics)
        detached = logps.detach()
        if len(c):
            metrics["logps/chosen"] = detached[c].mean()
        if len(r):
            metrics["logps/rejected"] = detached[r].mean()
        if batch.paired:
            # Does the policy itself rank the pair right (mean token log-prob)? Unlike the
            # implicit reward, this is informative before training too.
            per_token = detached / lengths.detach().clamp(min=1)
            metrics["policy/prefers_chosen"] = (per_token[c] > per_token[r]).float().mean()
        return out.loss, metrics

    def score_loss(self, model, batch: SequenceBatch):
        """(loss, metrics) for a loss that trains a sequence classifier on the batch's rows."""
        scores = sequence_scores(model, batch)
        lengths = torch.zeros(batch.num_rows, device=scores.device).index_add(
            0, batch.predict_row, torch.ones(len(batch.predict_row), device=scores.device)
        )
        c, r = batch.chosen_rows, batch.rejected_rows
        inputs = LossInputs(
            chosen_scores=scores[c], rejected_scores=scores[r], chosen_lengths=lengths[c], rejected_lengths=lengths[r]
        )
        out = self.loss_fn(inputs, **self.loss_args)
        return out.loss, _detached(out.metrics)

    def across_processes(self, values: torch.Tensor) -> torch.Tensor:
        """The 1-D `values` of every process, concatenated (processes may hold different counts)."""
        padded = self.accelerator.pad_across_processes(values.float(), dim=0, pad_index=float("nan"))
        gathered = self.accelerator.gather(padded)
        return gathered[~torch.isnan(gathered)]

    def describe_examples(self, indices: list[int]) -> str:
        items = self.train_dataset.items
        return ", ".join(items[i].where or f"#{i}" for i in indices if i < len(items)) or "-"

    def nonfinite(self, what: str, indices: list[int]) -> bool:
        """Skip this batch if the budget allows (True), else stop the run with a clear error."""
        step = self.state.global_step + 1
        where = self.describe_examples(indices)
        if self.skip_nonfinite > 0:
            self.skip_nonfinite -= 1
            self.skipped_batches.append(f"step {step}: {what} (examples {where})")
            print(f"prefopt: skipped a batch with a non-finite {what} at step {step} (examples {where})")
            return True
        raise NonFiniteError(
            f"non-finite {what} at step {step} (examples {where}); the run stopped and its last good checkpoint "
            "is kept: fix the data or lower the learning rate, then continue with --resume "
            "(or pass --skip-nonfinite N to skip such batches)"
        )

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """Mixed precision: accelerate wraps only the policy's `forward` in autocast; the reference,
        the output head and the loss run under the same one (transformers enters this around
        compute_loss; `evaluate` enters it too). logps.py keeps the sums in fp32."""
        from prefopt.models.precision import autocast_context

        return autocast_context(self.args)

    def record_grad_norm(self, norm) -> None:
        # transformers computes the total (pre-clip) gradient norm every step; GradientGuard reads
        # it instead of making another pass over every gradient (it makes its own if a
        # transformers version stops reporting it).
        self.step_grad_norm = norm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.rollouts is not None:  # prompts: sample, score, then the loss over the completions' tokens
            loss, metrics, batch = self.rollouts(model, inputs["prompts"], self.loss_fn, self.loss_args, self.reference)
        else:
            batch = SequenceBatch(**inputs)
            loss, metrics = self.batch_loss(model, batch)
        if model.training and any_process(not torch.isfinite(loss).item(), self.args.device):
            # Every process skips (or stops) together: one process alone would leave the others
            # waiting in the gradient all-reduce (DESIGN §7).
            self.nonfinite("loss", batch.example_indices)
            # A zero that still reaches every trainable weight, so DDP's gradient reduction runs as
            # usual (a fresh zero has no graph: the reducer would never fire, and the next step
            # would fail). The skipped batch adds nothing: every gradient of this micro-batch is 0.
            # ZeRO-3's partitioned weights are left out: DeepSpeed reduces what backward produced,
            # the same (nothing) on every process, since all of them skip together.
            loss = torch.zeros((), device=loss.device, requires_grad=True)
            loss = loss + sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad and weight_is_whole(p))
            return (loss, {}) if return_outputs else loss
        if model.training:
            self.last_example_indices = batch.example_indices
            for name, value in metrics.items():
                self._window[name].append(value)
            self._window_tokens += batch.num_tokens
        return (loss, {}) if return_outputs else loss

    def create_optimizer(self, model=None):
        """transformers' optimizer over the policy, plus the critic's value head as its own group
        (no weight decay), so the schedule, the optimizer state and its checkpoint cover both."""
        optimizer = super().create_optimizer(model)
        critic = {id(p) for p in self.critic.parameters()} if self.critic is not None else set()
        if critic and not any(id(p) in critic for group in optimizer.param_groups for p in group["params"]):
            group = {"params": list(self.critic.parameters()), "weight_decay": 0.0}
            if self.value_learning_rate is not None:  # a fresh head may need larger steps than the policy
                group["lr"] = self.value_learning_rate
            optimizer.add_param_group(group)
        return optimizer

    # -- checkpoints -------------------------------------------------------------------------

    def write_checkpoint(self, save) -> None:
        """Write checkpoint-N under a staging folder, then rename it into place.

        A kill during the save leaves only the staging folder, never a half-written
        checkpoint-N, so --resume always finds a complete newest checkpoint. Rotation
        (--save-total-limit) then runs on the real folder, oldest steps first. (Single process;
        with several processes transformers' in-place layout is kept.)
        """
        if self.args.world_size > 1:  # several writers (FSDP/DeepSpeed shards): transformers' own layout
            save()
            self._write_prefopt_state(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}")
            return
        final_root = self.args.output_dir
        staging_root = Path(final_root) / ".staging"
        shutil.rmtree(staging_root, ignore_errors=True)
        staging_root.mkdir(parents=True)
        self.args.output_dir = str(staging_root)
        try:
            save()
        finally:
            self.args.output_dir = final_root
        name = f"checkpoint-{self.state.global_step}"
        self._write_prefopt_state(staging_root / name)
        target = Path(final_root) / name
        if target.exists():  # the same step saved again (e.g. an interrupt right after a scheduled save)
            shutil.rmtree(target)
        os.replace(staging_root / name, target)
        shutil.rmtree(staging_root, ignore_errors=True)
        rotate_checkpoints(
            output_dir=final_root,
            save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint,
            use_mtime=False,  # by step number: renames make mtimes useless
        )

    def _write_prefopt_state(self, checkpoint: Path) -> None:
        window = self.rollouts.window_state() if self.rollouts is not None else None
        if window is not None and checkpoint.is_dir():  # every process keeps its own half-used window
            from prefopt.online.reuse import ROLLOUT_STATE

            torch.save(window, checkpoint / ROLLOUT_STATE.format(rank=self.args.process_index))
        if self.args.should_save and checkpoint.is_dir():
            state = {"skipped_batches": self.skipped_batches, "precision": self.precision_record}
            (checkpoint / PREFOPT_STATE).write_text(json.dumps(state, indent=2))
            if self.critic is not None:
                self.critic.save(checkpoint)

    def restore_prefopt_state(self, checkpoint: Path) -> None:
        """On resume: batches skipped before the checkpoint count against --skip-nonfinite."""
        path = Path(checkpoint) / PREFOPT_STATE
        if path.exists():
            self.skipped_batches = list(json.loads(path.read_text()).get("skipped_batches", []))
            self.skip_nonfinite = max(0, self.skip_nonfinite - len(self.skipped_batches))
        if self.critic is not None and not self.critic.load(checkpoint):
            raise PrefoptError(f"{checkpoint} has no value head ({VALUE_HEAD_FILE}) to resume PPO's critic from")
        if self.rollouts is not None:  # a rollout window the checkpoint cut: continue it, exactly
            from prefopt.online.reuse import ROLLOUT_STATE

            path = Path(checkpoint) / ROLLOUT_STATE.format(rank=self.args.process_index)
            window = torch.load(path, weights_only=True) if path.exists() else None
            step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
            self.rollouts.restore_window(window, step * self.args.gradient_accumulation_steps, self.args.device)

    # -- data ----------------------------------------------------------------------------

    def train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        plan = self.rollouts.window.plan if self.rollouts is not None else None
        if plan is not None and plan.active:  # each generation batch mu x S times (online/reuse.py)
            from prefopt.online.reuse import RolloutSampler

            return RolloutSampler(
                len(dataset),
                self.args.train_batch_size * plan.steps_per_generation,
                self.args.world_size,
                plan.window,
                self.args.seed,
            )
        if self.group_by_length:
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=item_lengths(dataset.items),
            )
        return None

    def train_batch_multiple(self) -> int:
        """Rollout reuse loads batch_size x steps_per_generation prompts per micro-batch."""
        plan = self.rollouts.window.plan if self.rollouts is not None else None
        return plan.steps_per_generation if plan is not None and plan.active else 1

    # -- logging and evaluation ------------------------------------------------------------

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the loss's metrics averaged over the window
            now = time.time()
            logs.update(window_means(self._window))
            if self.train_start is not None:
                logs["elapsed_s"] = round(now - self.train_start, 3)
            if self._window_start is not None and now > self._window_start:
                logs["tokens_per_s"] = round(self._window_tokens / (now - self._window_start), 1)
            self._window.clear()
            self._window_tokens, self._window_start = 0, now
        super().log(logs, start_time)

    def start_clock(self) -> None:
        self.train_start = self._window_start = time.time()

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Loss and metrics over a held-out set (weighted by examples), logged with the prefix.

        Weights change only with the step, so the same evaluation asked for twice at one step
        (transformers' scheduled one at the last step, then the run's "after training" one) is
        computed and logged once."""
        done = self._evaluations.get((metric_key_prefix, self.state.global_step)) if eval_dataset is None else None
        if done is not None:
            return dict(done)
        dataloader = self.get_eval_dataloader(eval_dataset)
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        try:
            for inputs in dataloader:
                batch = SequenceBatch(**self.prepared(inputs))
                with self.autocast_smart_context_manager():
                    loss, metrics = self.batch_loss(self.model, batch)
                n = len(batch.example_indices)
                for name, value in window_means(
                    {"loss": [loss.detach()], **{k: [v] for k, v in metrics.items()}}
                ).items():
                    sums[name] += value * n
                    counts[name] += n
        finally:
            self.model.train(was_training)
        if self.args.world_size > 1:  # each process saw its shard: the held-out numbers are over all of them
            import torch.distributed as dist

            shards = [None] * self.args.world_size
            dist.all_gather_object(shards, (dict(sums), dict(counts)))
            sums, counts = defaultdict(float), defaultdict(int)
            for shard_sums, shard_counts in shards:
                for name, value in shard_sums.items():
                    sums[name] += value
                    counts[name] += shard_counts[name]
        results = {f"{metric_key_prefix}_{name}": sums[name] / counts[name] for name in sums}
        self.log(dict(results))
        if eval_dataset is None:
            self._evaluations[(metric_key_prefix, self.state.global_step)] = dict(results)
        return results
