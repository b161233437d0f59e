"""What a run shows and writes while it trains: metrics.jsonl and a short console line per log."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

# Shown on the console line, in this order, when present.
_CONSOLE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "learning_rate", "tokens_per_s")


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


class MetricsFile(TrainerCallback):
    """Appends one JSON object per log to OUTPUT_DIR/metrics.jsonl (training and eval logs)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class ConsoleProgress(ProgressCallback):
    """transformers' progress bar (with ETA), but a short line per log instead of a dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or self.training_bar is None:
            return
        if "loss" in logs:
            parts = [f"step {state.global_step}/{state.max_steps}"]
            for key in _CONSOLE_KEYS:
                if key in logs:
                    value = logs[key]
                    parts.append(f"{key.split('/')[-1]} {value:.3g}" if isinstance(value, float) else f"{key} {value}")
            self.training_bar.write("  ".join(parts))
        elif any(k.startswith("eval_") for k in logs):
            shown = {
                k: v for k, v in logs.items() if k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
            }
            self.training_bar.write(
                f"eval @ step {state.global_step}: " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items())
            )


def install_progress(trainer) -> None:
    """Progress display. In a terminal, transformers' tqdm bar becomes ConsoleProgress (one short line
    per log). In a notebook transformers installs its notebook bar (kept, with the early-stop fix
    below), or with tqdm disabled plain printed lines (kept as they are)."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(ConsoleProgress())
        return
    from transformers.utils.import_utils import is_in_notebook

    if is_in_notebook():
        from transformers.utils.notebook import NotebookProgressCallback

        if trainer.pop_callback(NotebookProgressCallback) is not None:
            trainer.add_callback(_notebook_progress_class()())


def _notebook_progress_class():
    from transformers.utils.notebook import NotebookProgressCallback

    class NotebookProgress(NotebookProgressCallback):
        """transformers' notebook bar, safe when a run stops early.

        The bar starts at value 2 (it shows global_step + 1). When a run ends at step 2 (a kernel
        interrupt, say), the final update has nothing to average over: transformers resets the bar's time per step to None but keeps its predicted remaining
        time, and formatting the label then divides by None (TypeError). Clearing the
        prediction first makes the bar show elapsed time only, which is what is known.
        """

        def on_train_end(self, args, state, control, **kwargs):
            if self.training_tracker is not None:
                self.training_tracker.predicted_remaining = None
            return super().on_train_end(args, state, control, **kwargs)

    return NotebookProgress


class GradientGuard(TrainerCallback):
    """Before each optimizer step: a NaN/inf gradient stops the run (or, within --skip-nonfinite, is dropped)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        norm, self.trainer.step_grad_norm = self.trainer.step_grad_norm, None
        if getattr(self.trainer.accelerator, "scaler", None) is not None:
            # fp16 loss scaling: an inf gradient is an overflow of the scale, which the GradScaler
            # answers itself (it skips this step and halves the scale), not a diverged run. A
            # diverged one shows in the loss, which compute_loss checks every micro-batch.
            return
        if norm is None:  # the trainer did not see this step's norm: take the largest |g| (NaN/inf iff one is)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, norm_type=float("inf")) if grads else 0.0
        if not math.isfinite(float(norm)):
            self.trainer.nonfinite("gradient", self.trainer.last_example_indices)
            for p in model.parameters():
                p.grad = None  # optimizers skip parameters without a gradient


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, stop; the caller says how to resume."""

    def __init__(self):
        self.received: str | None = None
        self.stopped = False  # True once a signal cut training short (after a step, with a checkpoint)

    def handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def on_step_end(self, args, state, control, **kwargs):
        if self.received:
            control.should_save = True
            control.should_training_stop = True
            self.stopped = True
