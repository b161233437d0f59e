"""Online iterative DPO / rejection sampling (Xiong et al. 2023; RLHFlow): sample, score, pair, train, repeat.

Round t (1..T) samples N completions per prompt with pi_{t-1} on a fresh slice of the prompts,
scores them with the reward, pairs them (best-worst, or best-of-N SFT data for rejection
sampling), and trains pi_t from pi_{t-1}. Everything a round makes lies in D/round-t/:
samples.jsonl, pairs.jsonl, run/ (a prefopt run with final/), model/ (pi_t merged, when the
run trained a LoRA adapter) and eval.json (held-out greedy mean reward). A round whose
eval.json exists is skipped when the command runs again, so a stopped loop resumes; a round
stopped half-way reuses its samples and pairs and retrains.

Reference: the loss's reference is pi_0 in every round (`reference_model`), as in Xiong et al.
2023 and RLHFlow; with `reference: cached` its log-probs come from a cache keyed by weights and data.
Held out: the first `held_out` prompts are never trained on; each round's pi_t is scored on
them with greedy decoding (one sample), and pi_0 in round-0/eval.json.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from prefopt.errors import PrefoptError


@dataclass
class IterateSettings:
    prompts: list = field(default_factory=list)
    reward: str = ""
    reward_args: dict = field(default_factory=dict)
    reward_module: list = field(default_factory=list)
    rounds: int = 2
    num_samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    sample_batch_size: int = 8
    prompts_per_round: int | None = None  # default: the training prompts split evenly over the rounds
    held_out: int = 0
    selection: str = "best-worst"  # or best-of-n (rejection sampling: SFT data)
    min_margin: float = 0.0
    threshold: float | None = None  # best-of-n: keep the best only from this reward on

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if isinstance(self.reward_module, str):
            self.reward_module = [self.reward_module]
        if not self.prompts:
            raise PrefoptError("iterate needs --prompts FILE")
        if not self.reward:
            raise PrefoptError("iterate needs --reward NAME (`prefopt rewards` lists them)")
        if self.rounds < 1:
            raise PrefoptError(f"rounds must be >= 1, got {self.rounds}")


ITERATE_KEYS = {f.name for f in dataclasses.fields(IterateSettings)}


@dataclass
class RoundResult:
    round: int
    model: str
    prompts: int = 0
    pairs: int = 0
    held_out_reward: float | None = None
    skipped: bool = False


def _reward(settings: IterateSettings):
    from prefopt.rewards import get_reward, import_reward_module

    for module in settings.reward_module:
        import_reward_module(module)
    return get_reward(settings.reward, **settings.reward_args)


def _sample(model_path: str, prompts, settings: IterateSettings, reward, greedy: bool, seed: int, config):
    from prefopt.models.inference import load_for_inference
    from prefopt.models.rollout import SampleSettings, sample_prompts, sample_records, score_samples

    sample_settings = SampleSettings(
        num_samples=1 if greedy else settings.num_samples,
        max_new_tokens=settings.max_new_tokens,
        temperature=0.0 if greedy else settings.temperature,
        top_p=settings.top_p,
        seed=seed,
        batch_size=settings.sample_batch_size,
        max_prompt_length=config.max_prompt_length,
    )
    model, tokenizer = load_for_inference(model_path)
    samples = sample_prompts(model, tokenizer, prompts, sample_settings, progress="prefopt: sampling")
    del model
    rewards, _ = score_samples(reward, prompts, samples)
    return sample_records(prompts, samples, rewards), rewards


def _mean(rewards: list[list]) -> float | None:
    scored = [r for group in rewards for r in group if r is not None]
    return sum(scored) / len(scored) if scored else None


def _evaluate(folder: Path, model_path: str, held_out, settings, reward, config) -> float | None:
    """Held-out greedy mean reward of `model_path`, written to folder/eval.json (the round's done mark)."""
    from prefopt.models.rollout import write_jsonl

    if not held_out:
        value = None
    else:
        records, rewards = _sample(model_path, held_out, settings, reward, True, config.seed, config)
        write_jsonl(folder / "held_out.jsonl", records, overwrite=True)
        value = _mean(rewards)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps({"model": model_path, "held_out_mean_reward": value}, indent=2))
    return value


def _pairs(samples_path: Path, settings: IterateSettings, seed: int):
    from prefopt.iterative import pairs

    samples = pairs.read_samples(samples_path)
    if settings.selection == "best-of-n":
        return pairs.select_best_of_n(samples, settings.threshold)
    return pairs.select_pairs(samples, settings.selection, settings.min_margin, seed)


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()  # the trainer holds reference cycles (callbacks, accelerator) that refcounting leaves
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _round_model(run_final: Path, folder: Path) -> str:
    """pi_t as a full model folder: the run's final/, or its adapter merged into the base."""
    from prefopt.models.inference import is_adapter, load_for_inference

    if not is_adapter(str(run_final)):
        return str(run_final)
    merged = folder / "model"
    if not (merged / "config.json").exists():
        model, tokenizer = load_for_inference(str(run_final), device="cpu", dtype="float32")
        model.save_pretrained(merged)
        tokenizer.save_pretrained(merged)
    return str(merged)


def _train_config(base, model_path: str, reference: str, data: Path, output_dir: Path, round_index: int):
    """The round's TrainConfig. A round stopped mid-training continues from its newest checkpoint
    (exactly, as `prefopt train --resume`); one stopped before its first checkpoint trains again."""
    from prefopt.training.outputs import checkpoints

    changes = {"model": model_path, "data": [str(data)], "output_dir": str(output_dir), "eval_data": []}
    changes["seed"] = base.seed + round_index
    stopped = output_dir.exists() and not (output_dir / "final").exists()
    changes["resume"] = stopped and bool(checkpoints(output_dir))
    changes["overwrite"] = stopped and not changes["resume"]
    changes["reference_model"] = reference  # pi_0 stays the reference in every round
    return dataclasses.replace(base, **changes)


def iterate(settings: IterateSettings, config, output_dir: str | Path | None = None, log=print) -> list[RoundResult]:
    """Run (or resume) the loop; returns one RoundResult per round, round 0 being pi_0."""
    from prefopt.data.formats import load_prompts
    from prefopt.iterative.pairs import PairReport
    from prefopt.models.rollout import write_jsonl
    from prefopt.training.run import train

    root = Path(output_dir or config.output_dir)
    reward = _reward(settings)  # a bad reward fails before any model loads
    prompts, _ = load_prompts(settings.prompts)
    held_out, pool = prompts[: settings.held_out], prompts[settings.held_out :]
    if not pool:
        raise PrefoptError(f"no training prompts left after holding out {settings.held_out}")
    per_round = settings.prompts_per_round or max(1, len(pool) // settings.rounds)
    pi0 = config.model
    results = []
    eval0 = root / "round-0" / "eval.json"
    if eval0.exists():
        results.append(
            RoundResult(0, pi0, held_out_reward=json.loads(eval0.read_text())["held_out_mean_reward"], skipped=True)
        )
    else:
        results.append(
            RoundResult(0, pi0, held_out_reward=_evaluate(root / "round-0", pi0, held_out, settings, reward, config))
        )
    model = pi0
    for t in range(1, settings.rounds + 1):
        folder = root / f"round-{t}"
        if (folder / "eval.json").exists() and (folder / "run" / "final").exists():
            done = json.loads((folder / "eval.json").read_text())
            pairs_count = sum(1 for _ in open(folder / "pairs.jsonl"))
            results.append(RoundResult(t, done["model"], 0, pairs_count, done["held_out_mean_reward"], skipped=True))
            model = done["model"]
            log(f"prefopt: round {t}: done before, skipped")
            continue
        start = ((t - 1) * per_round) % len(pool)
        chunk = (pool + pool)[start : start + per_round]  # a fresh slice; wraps around when prompts run out
        folder.mkdir(parents=True, exist_ok=True)
        samples_path, pairs_path = folder / "samples.jsonl", folder / "pairs.jsonl"
        if not samples_path.exists():
            records, rewards = _sample(model, chunk, settings, reward, False, config.seed + t, config)
            write_jsonl(samples_path, records)
            log(f"prefopt: round {t}: {len(chunk)} prompts sampled by {model}, mean reward {_mean(rewards)}")
        if not pairs_path.exists():
            pair_records, report = _pairs(samples_path, settings, config.seed + t)
            if not pair_records:
                raise PrefoptError(f"round {t} yielded no training data: {report.why_empty()}")
            write_jsonl(pairs_path, pair_records)
            log(f"prefopt: round {t}: {report.summary()}")
        else:
            report = PairReport(written=sum(1 for _ in open(pairs_path)))
        final = folder / "run" / "final"
        if not final.exists():  # a round stopped after training keeps its model
            round_config = _train_config(config, model, pi0, pairs_path, folder / "run", t)
            if round_config.resume:
                log(f"prefopt: round {t}: its training stopped; resuming from its newest checkpoint")
            run = train(round_config)
            interrupted = run.interrupted
            # The round's trainer (policy, optimizer state, reference copy) is done with: let it go
            # before this round's evaluation and the next round's sampling load their own models.
            del run
            _release_memory()
            if interrupted:
                raise PrefoptError(f"round {t} was interrupted ({interrupted}); run the command again to resume")
        model = _round_model(final, folder)
        value = _evaluate(folder, model, held_out, settings, reward, config)
        results.append(RoundResult(t, model, len(chunk), report.written, value))
    return results


def format_table(results: list[RoundResult], reward_name: str) -> str:
    lines = [
        f"round  prompts  pairs  held-out greedy {reward_name}",
        "-----  -------  -----  " + "-" * (16 + len(reward_name)),
    ]
    for r in results:
        value = "-" if r.held_out_reward is None else f"{r.held_out_reward:.4f}"
        prompts = "-" if r.round == 0 or r.skipped else str(r.prompts)
        pairs = "-" if r.round == 0 else str(r.pairs)
        lines.append(
            f"{r.round:<5}  {prompts:<7}  {pairs:<5}  {value}" + ("  (done before)" if r.skipped and r.round else "")
        )
    return "\n".join(lines)
