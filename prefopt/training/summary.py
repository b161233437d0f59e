"""What a finished run reports: summary.json's figures and the console's closing lines.

The reward figures shown are whatever the loss reported (accuracy and margin for pairs; for
unpaired losses such as KTO the desirable/undesirable rewards and the KL estimate), named by the
data's shape, never by the loss's name.
"""

from __future__ import annotations

from pathlib import Path


def build_summary(
    trainer, last: dict, seconds: float, reference_mode: str, eval_before: dict, eval_after: dict
) -> dict:
    return {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "tokens_per_s": last.get("tokens_per_s"),
        "final_loss": last.get("loss"),
        "final_loss_step": last.get("step"),  # the last logged step: not the final one between logging steps
        "reward_accuracy": last.get("rewards/accuracies"),
        "reward_margin": last.get("rewards/margins"),
        "reward_chosen": last.get("rewards/chosen"),
        "reward_rejected": last.get("rewards/rejected"),
        "kl": last.get("kl"),
        "reward": last.get("reward"),
        "reference": reference_mode,
        "eval_before": eval_before,
        "eval_after": eval_after,
    }


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _reward_parts(values: dict, paired: bool) -> list[str]:
    """The reward figures this loss reported, in words (unpaired data: desirable/undesirable)."""
    chosen, rejected = ("chosen", "rejected") if paired else ("desirable", "undesirable")
    labels = {
        "reward_accuracy": "reward accuracy",
        "reward_margin": "margin",
        "reward_chosen": f"reward {chosen}",
        "reward_rejected": f"reward {rejected}",
        "kl": "KL estimate",
        "reward": "mean reward",
    }
    shown = [key for key in labels if values.get(key) is not None]
    if "reward_accuracy" in shown:  # paired losses: accuracy and margin say it; chosen/rejected are in metrics.jsonl
        shown = [key for key in shown if key in ("reward_accuracy", "reward_margin")]
    return [f"{labels[key]} {_fmt(values[key])}" for key in shown]


_EVAL_KEYS = {
    "reward_accuracy": "rewards/accuracies",
    "reward_margin": "rewards/margins",
    "reward_chosen": "rewards/chosen",
    "reward_rejected": "rewards/rejected",
    "kl": "kl",
}


def print_summary(summary: dict, final_dir: Path, paired: bool = True) -> None:
    parts = [
        f"{summary['steps']} steps in {summary['seconds']:.1f}s",
        f"{_fmt(summary['tokens_per_s'])} tokens/s",
        f"loss {_fmt(summary['final_loss'])}",
        *_reward_parts(summary, paired),
    ]
    logged = summary.get("final_loss_step")
    if logged is not None and logged != summary["steps"]:  # e.g. 8 steps logged every 10: step 1's figures
        parts[2] += f" (at step {logged}, the last logged: --logging-steps)"
    print("prefopt: done: " + ", ".join(parts))
    for label, prefix in (("before", "eval_before_"), ("after", "eval_")):
        values = {k[len(prefix) :]: v for k, v in summary[f"eval_{label}"].items()}
        if values:
            named = {key: values.get(metric) for key, metric in _EVAL_KEYS.items()}
            parts = [f"loss {_fmt(values.get('loss'))}", *_reward_parts(named, paired)]
            if values.get("policy/prefers_chosen") is not None:
                parts.append(f"policy prefers chosen {_fmt(values['policy/prefers_chosen'])}")
            print(f"prefopt: held-out {label:<6}: " + ", ".join(parts))
    print(f"prefopt: final model in {final_dir}")
