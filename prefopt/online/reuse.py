"""Rollout reuse: each sampled batch serves `num_iterations` (mu) optimisation passes, in
`steps_per_generation` (S) mini-batches, as GRPO's mu (Shao et al. 2024, Alg. 1) and PPO's epochs
over mini-batches (Schulman et al. 2017, Alg. 1) do, in TRL GRPOTrainer's layout.

The data stream is TRL's (`RepeatSampler`): the loader yields a *generation batch* of
batch_size x S prompts per micro-batch, and each generation batch comes mu x S times in a row. The
first micro-batch of such a window samples and scores all of it and splits it by prompt into S
slices; micro-batch k of the window trains on slice k mod S. With one update per sampled batch
(mu = S = 1) nothing of this runs and the stream is transformers' own.

The sampling policy's token log-probs (PPO's pi_old) are what makes the ratio rho and the clips
real on the passes after the first. A slice whose first pass falls in the optimizer step that
sampled it (the first grad_accum slices) takes them from that pass, detached, since no update has
happened yet: no extra forward. A slice first trained after an update (S > grad_accum) gets them
from a no-grad forward when it is sampled, as TRL computes `old_per_token_logps`.

A checkpoint taken inside a window keeps the window (`RolloutWindow.state`): --resume continues
it with the same completions, rewards and pi_old, so it computes what an uninterrupted run does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prefopt.errors import PrefoptError

ROLLOUT_STATE = "rollout_window_rank{rank}.pt"  # one per process, inside checkpoint-N


@dataclass(frozen=True)
class ReusePlan:
    """How sampled batches are reused: mu passes of S mini-batches (micro-batches) each."""

    num_iterations: int = 1
    steps_per_generation: int = 1

    @property
    def window(self) -> int:
        """Micro-batches that share one sampled generation batch."""
        return self.num_iterations * self.steps_per_generation

    @property
    def active(self) -> bool:
        return self.window > 1


def reuse_plan(num_iterations: int, steps_per_generation: int | None, grad_accum: int) -> ReusePlan:
    """The plan a config asks for. S defaults to one optimizer step's micro-batches when rollouts are
    reused (TRL's default), and to 1 otherwise (one micro-batch samples its own prompts: today's
    stream, draw for draw). TrainConfig checks that S is a multiple of grad_accum, so that every pass
    starts an optimizer step (else one step could see a slice twice)."""
    if steps_per_generation is None:
        steps_per_generation = grad_accum if num_iterations > 1 else 1
    return ReusePlan(num_iterations, steps_per_generation)


def check_enough_prompts(num_prompts: int, chunk: int) -> None:
    """A reused generation batch takes `chunk` = batch_size x S x processes prompts at a time; fewer
    prompts than that would make an empty epoch. Checked when the prompts are read (before the model
    loads) and again by the sampler."""
    if num_prompts < chunk:
        raise PrefoptError(
            f"rollout reuse samples {chunk} prompts at a time (batch_size x steps_per_generation x "
            f"processes) but the data has {num_prompts}: lower batch_size or steps_per_generation"
        )


class RolloutSampler(torch.utils.data.Sampler):
    """Prompt indices for reuse: a seeded permutation per epoch, cut into chunks of one generation
    batch for every process (batch_size x S x processes prompts), each chunk yielded mu x S times.

    accelerate gives process p the p-th of every `processes` loader batches of batch_size x S, so
    within each repeat every process gets its own share of the chunk. An incomplete last chunk is
    left out (TRL's RepeatSampler does the same), so windows never straddle epochs."""

    def __init__(self, num_items: int, prompts_per_process: int, processes: int, repeats: int, seed: int):
        self.num_items = num_items
        self.chunk = prompts_per_process * processes
        self.repeats = repeats
        self.seed = seed
        self.epoch = 0
        check_enough_prompts(num_items, self.chunk)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.num_items // self.chunk) * self.chunk * self.repeats

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        for start in range(0, len(order) - self.chunk + 1, self.chunk):
            chunk = order[start : start + self.chunk]
            for _ in range(self.repeats):
                yield from chunk


@dataclass
class RolloutWindow:
    """The sampled generation batch being reused, and where the stream is in it.

    `calls` counts training micro-batches; `slices` holds one entry per mini-batch (an
    online.step.Rollout) once the window's first micro-batch has sampled them."""

    plan: ReusePlan
    calls: int = 0
    slices: list | None = field(default=None)

    def position(self) -> int:
        return self.calls % self.plan.window

    def needs_sampling(self) -> bool:
        return self.position() == 0 or self.slices is None

    def open(self) -> bool:
        """A window is half used: its slices must go into a checkpoint for an exact resume."""
        return self.slices is not None and self.position() != 0

    def state(self) -> dict:
        """Plain values and CPU tensors only (loadable with torch.load(weights_only=True))."""
        return {"calls": self.calls, "slices": [rollout.state() for rollout in self.slices or []]}
