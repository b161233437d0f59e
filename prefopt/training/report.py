"""`prefopt report`: one PNG of what one or more runs did, step by step (matplotlib, Agg backend).

Panels: loss, reward margin, reward accuracy, chosen and rejected log-probs, KL, the policy's own
preference for the chosen answer, gradient norm and learning rate, against the optimizer step.
Several runs are overlaid in one colour each, labelled by their loss (and folder, when two runs
share a loss). Evaluation points (`eval_*` logs, and `eval_before_*` at step 0) are drawn as
markers on the panel of the same metric.

Online runs (`prefopt iterate` folders: round-N/run/ per round) are drawn as one run whose
steps continue from round to round; their extra panels hold the held-out reward and the mean
completion length of each round's greedy answers (round-N/eval.json, held_out.jsonl), plotted at
the step where the round ended. Metrics logged under the names in ONLINE_PANELS (a mean sampled
reward, a KL to the reference, a completion length) are drawn there too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from prefopt.errors import PrefoptError

# (title, metric keys, y-scale); each key gets its own line style within a run's colour
PANELS = [
    ("loss", ["loss"], "linear"),
    ("reward margin", ["rewards/margins"], "linear"),
    ("reward accuracy", ["rewards/accuracies"], "linear"),
    ("log-probs: chosen (solid), rejected (dashed)", ["logps/chosen", "logps/rejected"], "linear"),
    ("KL: kl (solid), chosen (dashed), rejected (dotted)", ["kl", "kl/chosen", "kl/rejected"], "linear"),
    ("policy prefers chosen", ["policy/prefers_chosen"], "linear"),
    ("grad norm", ["grad_norm"], "linear"),
    ("learning rate", ["learning_rate"], "linear"),
]
ONLINE_PANELS = [
    ("reward (online)", ["reward", "reward/mean", "held_out_reward"], "linear"),
    ("completion length (online)", ["completion_length", "completions/mean_length", "held_out_length"], "linear"),
]
STYLES = ["-", "--", ":"]
SOFTWARE = "prefopt report"  # in the PNG's metadata: train replaces only a report.png it wrote


@dataclass
class RunLog:
    label: str
    folder: Path
    loss: str
    logs: list[dict] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        points = [(e["step"], e[key]) for e in self.logs if key in e and isinstance(e[key], (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    def has(self, keys: list[str]) -> bool:
        return any(self.series(k)[0] or self.series("eval_" + k)[0] for k in keys)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
    return rows


def _loss_name(folder: Path) -> str:
    import yaml

    config = folder / "config.yaml"
    if config.is_file():
        return (yaml.safe_load(config.read_text()) or {}).get("loss", "?")
    return "?"


def _eval_before(folder: Path) -> dict:
    """The held-out numbers before training (summary.json), logged at step 0."""
    summary = folder / "summary.json"
    if not summary.is_file():
        return {}
    before = json.loads(summary.read_text()).get("eval_before") or {}
    return {"eval_" + k[len("eval_before_") :]: v for k, v in before.items() if k.startswith("eval_before_")}


def _rounds(folder: Path) -> list[Path]:
    rounds = [p for p in folder.glob("round-*") if p.name.split("-")[-1].isdigit()]
    return sorted(rounds, key=lambda p: int(p.name.split("-")[-1]))


def _online_log(folder: Path) -> RunLog:
    """An iterate folder as one run: each round's steps after the last round's, plus held-out points."""
    logs, offset, loss = [], 0, "?"
    for round_dir in _rounds(folder):
        run = round_dir / "run"
        last = offset
        if (run / "metrics.jsonl").is_file():
            loss = _loss_name(run)
            for entry in _read_jsonl(run / "metrics.jsonl"):
                entry = dict(entry, step=entry.get("step", 0) + offset)
                last = max(last, entry["step"])
                logs.append(entry)
        point = {"step": last}
        if (round_dir / "eval.json").is_file():
            value = json.loads((round_dir / "eval.json").read_text()).get("held_out_mean_reward")
            if value is not None:
                point["held_out_reward"] = value
        if (round_dir / "held_out.jsonl").is_file():
            lengths = [
                len(ids) for r in _read_jsonl(round_dir / "held_out.jsonl") for ids in r.get("completion_ids", [])
            ]
            if lengths:
                point["held_out_length"] = sum(lengths) / len(lengths)
        if len(point) > 1:
            logs.append(point)
        offset = last
    return RunLog(f"{loss} (online)", folder, loss, logs)


def read_run(folder: str | Path) -> RunLog:
    folder = Path(folder)
    if (folder / "metrics.jsonl").is_file():
        before = _eval_before(folder)
        logs = ([dict(before, step=0)] if before else []) + _read_jsonl(folder / "metrics.jsonl")
        loss = _loss_name(folder)
        return RunLog(loss, folder, loss, logs)
    if _rounds(folder):
        return _online_log(folder)
    raise PrefoptError(f"{folder}: no metrics.jsonl (not a prefopt run folder)")


def _labels(runs: list[RunLog]) -> None:
    """Label by loss; runs sharing a loss also name their folder."""
    for run in runs:
        if sum(other.label == run.label for other in runs) > 1:
            run.label = f"{run.label} ({run.folder.name})"


def plot_runs(folders: list, output: str | Path = "report.png", title: str | None = None) -> Path:
    """Write the PNG; returns its path. The panel titles are in the figure's axes (one per panel)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runs = [read_run(f) for f in folders]
    _labels(runs)
    panels = list(PANELS) + [p for p in ONLINE_PANELS if any(run.has(p[1]) for run in runs)]
    columns = 3
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    try:
        for ax, (panel_title, keys, scale) in zip(axes.flat, panels, strict=False):
            ax.set_title(panel_title, fontsize=10)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=8)
            drawn = False
            for i, run in enumerate(runs):
                color = colors[i % len(colors)]
                for j, key in enumerate(keys):
                    steps, values = run.series(key)
                    if steps:
                        ax.plot(steps, values, STYLES[j % len(STYLES)], color=color, label=f"{run.label} {key}")
                        drawn = True
                    steps, values = run.series("eval_" + key)
                    if steps:  # evaluation points: markers, hollow for the rejected side
                        face = color if j == 0 else "none"
                        ax.plot(steps, values, "o", color=color, markerfacecolor=face, markersize=5)
                        drawn = True
            if drawn:
                if scale == "log" and all(v > 0 for run in runs for k in keys for v in run.series(k)[1]):
                    ax.set_yscale("log")
                ax.grid(alpha=0.3)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        handles = [plt.Line2D([], [], color=colors[i % len(colors)], label=run.label) for i, run in enumerate(runs)]
        handles.append(plt.Line2D([], [], color="gray", marker="o", linestyle="none", label="held-out evaluation"))
        figure.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=9)
        if title:
            figure.suptitle(title, y=0.995, fontsize=11)
        figure.tight_layout(rect=(0, 0, 1, 0.95))
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(output, dpi=90, metadata={"Software": SOFTWARE})
    finally:
        plt.close(figure)
    return output


def panel_titles(folders: list) -> list[str]:
    """The titles of the panels `plot_runs` draws for these runs (for tests and tools)."""
    runs = [read_run(f) for f in folders]
    return [p[0] for p in PANELS] + [p[0] for p in ONLINE_PANELS if any(run.has(p[1]) for run in runs)]


def write_run_report(output_dir: str | Path) -> Path | None:
    """`train`'s report.png; a failure to plot is printed, never raised (it must not fail a run)."""
    path = Path(output_dir) / "report.png"
    if path.exists() and SOFTWARE.encode() not in path.read_bytes()[:4096]:
        print(f"prefopt: report.png not written: {path} is not prefopt's (kept)")
        return None
    try:
        return plot_runs([output_dir], path)
    except Exception as error:  # noqa: BLE001 - plotting is a courtesy
        print(f"prefopt: report.png not written: {type(error).__name__}: {error}")
        return None
