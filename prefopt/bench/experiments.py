"""The papers' trends on a small scale: `python -m prefopt.bench.experiments NAME` (docs/experiments.md).

Each experiment trains SmolLM2-135M-Instruct (full weights) on pairs from Anthropic's HH-RLHF
harmless split, read where it lies (../shared/data, never copied), with each loss it compares,
under one seed, one data order and one learning rate. Every `probe_every` steps a callback
scores held-out pairs with the policy and the untrained model (`prefopt.evaluation.evaluate.score_pairs`,
the code `prefopt eval` uses) and logs the held-out log-prob shifts, KL(pi || pi_ref) and reward
accuracy beside the run (RUN.held_out.jsonl). One PNG per experiment.

- dpo-vs-dpop: chosen log-probs over steps. Smaug (Pal et al. 2024): DPO can lower the chosen
  answer's likelihood while widening the margin; DPOP's penalty holds it at the reference.
- tdpo: DPO vs TDPO1 vs TDPO2, sequence KL against reward accuracy (Zeng et al. 2024: TDPO
  reaches similar accuracy at lower KL).
- orpo: ORPO (Hong et al. 2024) has no reference model; its NLL term raises the chosen log-prob.
- kto-imbalance: KTO (Ethayarajh et al. 2024) on desirable:undesirable = 1:10, with equal
  weights and with the paper's rule lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].

Sized for two CPU cores: `--steps`, `--pairs` and `--max-length` make it smaller or larger.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[2]  # the repository (bench/ is two below)
HH_DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
KTO_RATIO = 10  # undesirable examples per desirable one
KTO_WEIGHTED = 12.0  # lambda_D with lambda_U = 1: 12 * n_D / (1 * 10 n_D) = 1.2, inside [1, 4/3]


@dataclass
class Settings:
    model: str = "smollm2-135m-instruct"
    data: str = str(HH_DATA)
    output_dir: str = "runs/experiments"
    figures: str = str(ROOT / "docs" / "experiments")
    steps: int = 40
    pairs: int = 160  # training pairs (KTO: desirable examples are pairs // KTO_RATIO)
    held_out: int = 24
    probe_every: int = 10
    batch_size: int = 4
    max_length: int = 160
    max_prompt_length: int = 96
    learning_rate: float = 1e-5
    seed: int = 0
    runs: dict = field(default_factory=dict)  # name -> run folder, filled in as runs finish


# name -> [(folder, label, loss, loss_args, data kind)]
EXPERIMENTS = {
    "dpo-vs-dpop": [("dpo", "dpo", "dpo", {}, "pairs"), ("dpop", "dpop", "dpop", {}, "pairs")],
    "tdpo": [
        ("dpo", "dpo", "dpo", {}, "pairs"),
        ("tdpo1", "tdpo1", "tdpo1", {}, "pairs"),
        ("tdpo2", "tdpo2", "tdpo2", {}, "pairs"),
    ],
    "orpo": [("orpo", "orpo", "orpo", {}, "pairs")],
    "kto-imbalance": [
        ("kto-equal", "kto, lambda_D = 1 (ratio 0.1)", "kto", {}, "kto"),
        (
            "kto-weighted",
            f"kto, lambda_D = {KTO_WEIGHTED:g} (ratio {KTO_WEIGHTED / KTO_RATIO:g})",
            "kto",
            {"desirable_weight": KTO_WEIGHTED},
            "kto",
        ),  # fmt: skip
    ],
}

_SHIFTS_TITLE = "held-out log pi - log pi_ref (solid chosen, dashed rejected)"


@dataclass(frozen=True)
class Figure:
    """What an experiment's figure shows. `kl_vs_accuracy`: panel 1 plots held-out KL against reward
    accuracy; otherwise panel 1 plots the chosen/rejected log-prob shifts and panel 3 the training
    batches' log-probs. `middle` is the held-out metric of panel 2."""

    titles: tuple[str, str, str]
    middle: str = "kl"
    kl_vs_accuracy: bool = False


FIGURES = {
    "dpo-vs-dpop": Figure((_SHIFTS_TITLE, "held-out KL(pi || pi_ref)", "training batch log-probs")),
    "tdpo": Figure(
        (
            "held-out KL(pi || pi_ref) vs reward accuracy",
            "held-out KL(pi || pi_ref) by step",
            "held-out reward accuracy by step",
        ),  # fmt: skip
        kl_vs_accuracy=True,
    ),
    "orpo": Figure((_SHIFTS_TITLE, "held-out KL(pi || pi_ref)", "training batch log-probs")),
    "kto-imbalance": Figure(
        (_SHIFTS_TITLE, "held-out reward accuracy (pairs)", "training batch log-probs"), middle="reward_accuracy"
    ),
}


class HeldOutProbe(TrainerCallback):
    """Every `every` steps (and before the first): held-out pair numbers of the policy against
    the untrained model, appended to `path` as JSON lines with the step."""

    def __init__(self, path: Path, batches: list, reference, every: int):
        self.path, self.batches, self.reference, self.every = Path(path), batches, reference, every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def probe(self, model, step: int) -> None:
        from prefopt.evaluation.evaluate import pair_metrics, score_pairs

        was_training = model.training
        model.eval()
        try:
            scores = score_pairs(model, self.reference, self.batches)
        finally:
            model.train(was_training)
        row = {"step": step, **pair_metrics(scores, beta=0.1)}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.probe(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.probe(model, state.global_step)


def _pairs(settings: Settings) -> tuple[list, list]:
    """(training pairs, held-out pairs) from the data file, in a fixed shuffled order."""
    from prefopt.data import load_examples

    examples = load_examples([settings.data])[0]
    random.Random(settings.seed).shuffle(examples)
    held_out = examples[: settings.held_out]
    return examples[settings.held_out : settings.held_out + settings.pairs], held_out


def _write(path: Path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _data_files(settings: Settings, folder: Path, train_pairs: list) -> dict[str, str]:
    """kind -> training file: the pairs as they are, and KTO's 1:10 unpaired examples."""
    pairs = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in train_pairs]
    n_desirable = max(1, len(pairs) // KTO_RATIO)
    kto = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs[:n_desirable]]
    kto += [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in pairs]
    random.Random(settings.seed).shuffle(kto)
    return {"pairs": _write(folder / "data" / "train.jsonl", pairs), "kto": _write(folder / "data" / "kto.jsonl", kto)}


def run_experiment(name: str, settings: Settings, log=print) -> Path:
    """Train each run of experiment `name`, probing held-out pairs; write the figure; return its path."""
    from prefopt.config import TrainConfig
    from prefopt.evaluation.evaluate import pair_batches
    from prefopt.models.inference import load_for_inference
    from prefopt.training.run import train

    if name not in EXPERIMENTS:
        raise SystemExit(f"unknown experiment '{name}'; choose from {', '.join(EXPERIMENTS)}")
    folder = Path(settings.output_dir) / name
    train_pairs, held_out = _pairs(settings)
    files = _data_files(settings, folder, train_pairs)
    reference, tokenizer = load_for_inference(settings.model, dtype="float32")
    batches, _ = pair_batches(held_out, tokenizer, settings.max_length, settings.max_prompt_length, 8)
    started = time.time()
    for run_name, label, loss, loss_args, kind in EXPERIMENTS[name]:
        run_dir = folder / run_name
        config = TrainConfig(
            model=settings.model,
            data=[files[kind]],
            output_dir=str(run_dir),
            overwrite=True,
            loss=loss,
            loss_args=loss_args,
            max_steps=settings.steps,
            batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            lr_scheduler="constant",
            max_length=settings.max_length,
            max_prompt_length=settings.max_prompt_length,
            logging_steps=max(1, settings.probe_every // 2),
            save_steps=10_000,
            seed=settings.seed,
        )
        probe = HeldOutProbe(probe_file(run_dir), batches, reference, settings.probe_every)
        train(config, callbacks=[probe])
        settings.runs[label] = run_dir
        log(f"prefopt: experiment {name}: {label} done ({time.time() - started:.0f}s so far)")
    path = plot_experiment(name, settings.runs, Path(settings.figures) / f"{name}.png")
    log(f"prefopt: experiment {name}: {time.time() - started:.0f}s, figure {path}")
    return path


def probe_file(run_dir: Path) -> Path:
    """Beside the run folder (a run's folder holds only what the run writes)."""
    return run_dir.parent / f"{run_dir.name}.held_out.jsonl"


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    kept = [(r["step"], r[key]) for r in rows if key in r]
    return [k[0] for k in kept], [k[1] for k in kept]


def plot_experiment(name: str, runs: dict, output: Path) -> Path:
    """The experiment's figure from the runs' held_out.jsonl and metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    shape = FIGURES[name]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, folder) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        probes = _read(probe_file(Path(folder)))
        train_logs = [r for r in _read(Path(folder) / "metrics.jsonl") if "loss" in r]
        if shape.kl_vs_accuracy:
            acc, kl = _series(probes, "reward_accuracy")[1], _series(probes, "kl")[1]
            axes[0].plot(kl, acc, "o-", color=color, label=label)
            axes[1].plot(*_series(probes, shape.middle), "o-", color=color, label=label)
            axes[2].plot(*_series(probes, "reward_accuracy"), "o-", color=color, label=label)
        else:
            axes[0].plot(*_series(probes, "logps_shift_chosen"), "o-", color=color, label=f"{label} chosen")
            axes[0].plot(*_series(probes, "logps_shift_rejected"), "o--", color=color, label=f"{label} rejected")
            axes[1].plot(*_series(probes, shape.middle), "o-", color=color, label=label)
            axes[2].plot(*_series(train_logs, "logps/chosen"), "-", color=color, label=f"{label} chosen")
            axes[2].plot(*_series(train_logs, "logps/rejected"), "--", color=color, label=f"{label} rejected")
    for ax, title in zip(axes, shape.titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("KL(pi || pi_ref), nats" if (shape.kl_vs_accuracy and ax is axes[0]) else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not shape.kl_vs_accuracy:
        axes[0].axhline(0, color="black", linewidth=0.8)
    figure.suptitle(f"prefopt.bench.experiments {name}", fontsize=11)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=90)
    plt.close(figure)
    return output


def main(argv: list[str] | None = None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m prefopt.bench.experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=list(EXPERIMENTS))
    for key in ("model", "data", "output_dir", "figures", "steps", "pairs", "held_out", "probe_every", "batch_size",
                "max_length", "max_prompt_length", "learning_rate", "seed"):  # fmt: skip
        value = getattr(defaults, key)
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value, help=f"default {value}")
    args = vars(parser.parse_args(argv))
    name = args.pop("name")
    torch.manual_seed(args["seed"])
    run_experiment(name, Settings(**args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
