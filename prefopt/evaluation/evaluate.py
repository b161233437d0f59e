"""`prefopt eval`: what a trained policy does differently from its reference, on held-out data.

On held-out pairs (prompt, chosen, rejected), both models score every completion once
(`logps.score_model`, the code training uses) and the numbers are:

- the implicit reward r = beta * (log pi - log pi_ref) (DPO, Rafailov et al. 2023, Eq. 5):
  `reward_accuracy` (share of pairs with r_chosen > r_rejected, strict), `reward_margin`
  (mean r_chosen - r_rejected), `reward_chosen`, `reward_rejected`;
- `loss`: the run's own loss on the pairs (DPO's where the run's loss cannot be computed on
  pairs alone, e.g. KTO's mismatched pairs); `loss_name` says which;
- the log-prob shifts, mean over pairs of log pi - log pi_ref (summed over the completion):
  `logps_shift_chosen`, `logps_shift_rejected` (Smaug's point: DPO can push both down);
- `kl`: the sequence KL(pi || pi_ref) on the chosen completions, i.e. the sum over completion
  tokens of the full-vocabulary KL of the next-token distributions, mean over pairs
  (`kl_reverse`: KL(pi_ref || pi), TDPO's direction; `kl_per_token`: kl over tokens);
- `policy_prefers_chosen`: how often the policy itself gives the chosen answer the higher mean
  token log-prob (the trainer's `policy/prefers_chosen`), with `reference_prefers_chosen`
  beside it, and the mean per-token log-prob margins `logp_margin` / `reference_logp_margin`.
  Unlike the implicit reward, these are informative before training too.

With prompts and a reward (`--prompts F --reward NAME`), both models answer the held-out
prompts (`rollout.sample_prompts`, greedy unless a temperature is given), the reward scores
the answers (`rewards` registry), and the report has each model's mean reward and the policy's
win rate over the reference: the i-th answer of the policy against the i-th of the reference,
a win counting 1, a tie 1/2; a pairwise reward (the `judge`) gives P(policy wins) directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from prefopt.errors import PrefoptError
from prefopt.evaluation.ab_stats import win_rate_statistics

# the order in which the plain-text report lists the held-out pair numbers
PAIR_LINES = [
    ("reward_accuracy", "reward accuracy (r_chosen > r_rejected)"),
    ("reward_margin", "reward margin (beta * log-ratio gap)"),
    ("loss", "loss"),
    ("logps_shift_chosen", "log-prob shift, chosen (log pi - log pi_ref)"),
    ("logps_shift_rejected", "log-prob shift, rejected"),
    ("kl", "sequence KL(pi || pi_ref), chosen"),
    ("policy_prefers_chosen", "policy prefers chosen (mean token log-prob)"),
    ("reference_prefers_chosen", "reference prefers chosen"),
    ("logp_margin", "policy per-token log-prob margin"),
    ("reference_logp_margin", "reference per-token log-prob margin"),
]
GENERATION_LINES = [
    ("reward_policy", "mean reward, policy"),
    ("reward_reference", "mean reward, reference"),
    ("win_rate", "win rate of the policy over the reference"),
    ("length_policy", "mean completion tokens, policy"),
    ("length_reference", "mean completion tokens, reference"),
]


@dataclass
class Models:
    """Where the policy and the reference come from, and the run they belong to (if any)."""

    model: str
    reference: str
    run_config: dict


def _run_folder(model: str) -> Path | None:
    """The run a model belongs to: RUN/ itself (with final/) or RUN/final (config.yaml beside it)."""
    path = Path(model)
    if (path / "config.yaml").is_file() and (path / "final").is_dir():
        return path
    if (path.parent / "config.yaml").is_file() and path.is_dir():
        return path.parent
    return None


def resolve_models(model: str, reference: str | None = None) -> Models:
    """The policy folder and its reference: --reference, else the model the run started from,
    else an adapter's base model."""
    import yaml

    from prefopt.models.inference import adapter_base, is_adapter

    run = _run_folder(model)
    config = (yaml.safe_load((run / "config.yaml").read_text()) or {}) if run else {}
    if run is not None and Path(model) == run:
        model = str(run / "final")
    if reference is None:
        reference = config.get("reference_model") or config.get("model")
    if reference is None and is_adapter(model):
        reference = adapter_base(Path(model))
    if reference is None:
        raise PrefoptError(f"{model} is not a prefopt run's final/ (no config.yaml beside it): pass --reference MODEL")
    return Models(model, str(reference), config)


def _loss_for(config: dict, loss: str | None, beta: float | None):
    """(loss name, its function, resolved hyperparameters, beta for the implicit reward)."""
    from prefopt.losses import get_loss, get_loss_spec
    from prefopt.rewards.implicit import run_beta

    name = loss or config.get("loss") or "dpo"
    args = dict(config.get("loss_args") or {}) if name == config.get("loss") else {}
    spec = get_loss_spec(name)
    if not spec.paired or spec.needs_kl_pairs:  # KTO and the like need more than held-out pairs
        name, spec, args = "dpo", get_loss_spec("dpo"), {}
    if beta is not None and "beta" in spec.hyperparameters:
        args["beta"] = beta  # --beta is the loss's beta too
    resolved = spec.resolve(args)
    if beta is None:
        beta = run_beta({"loss": name, "loss_args": args})
    return name, get_loss(name), resolved, float(beta)


def _use_logits(model) -> bool:
    from prefopt.models.logps import head_matches_model

    probe = torch.tensor([[1, 2, 3, 4]], device=next(model.parameters()).device)
    return not head_matches_model(model, probe)


@torch.no_grad()
def score_pairs(policy, reference, batches, chunk_size: int = 1024) -> dict[str, torch.Tensor]:
    """Per pair: both models' summed log-probs and lengths of chosen and rejected, and the
    sequence KLs in both directions. `batches` are paired SequenceBatches (plain layout)."""
    from prefopt.models.logps import score_completions, score_model

    use_logits = _use_logits(policy) or _use_logits(reference)
    device = next(policy.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        batch = batch.to(device)
        (logps, lengths, _), states, head = score_model(policy, batch, use_logits, chunk_size)
        # the reference's forward, scored against the policy's distributions: KL(pi || pi_ref)
        (ref_logps, _, kl), ref_states, ref_head = score_model(reference, batch, use_logits, chunk_size, head, states)
        # no new forward for the other direction, KL(pi_ref || pi): heads on the kept states
        _, _, kl_reverse = score_completions(head, states, chunk_size, ref_head, ref_states)
        c, r = batch.chosen_rows, batch.rejected_rows
        values = {
            "policy_chosen": logps[c],
            "policy_rejected": logps[r],
            "reference_chosen": ref_logps[c],
            "reference_rejected": ref_logps[r],
            "chosen_lengths": lengths[c],
            "rejected_lengths": lengths[r],
            "kl_chosen": kl[c],
            "kl_rejected": kl[r],
            "kl_reverse_chosen": kl_reverse[c],
            "kl_reverse_rejected": kl_reverse[r],
        }
        for key, value in values.items():
            parts.setdefault(key, []).append(value.float().cpu())
    return {key: torch.cat(value) for key, value in parts.items()}


def pair_metrics(scores: dict[str, torch.Tensor], beta: float, loss_fn=None, loss_args: dict | None = None) -> dict:
    """The held-out pair numbers (see the module docstring) from `score_pairs`' per-pair values."""
    from prefopt.losses import LossInputs

    pc, pr = scores["policy_chosen"], scores["policy_rejected"]
    rc, rr = scores["reference_chosen"], scores["reference_rejected"]
    lc, lr = scores["chosen_lengths"].clamp(min=1), scores["rejected_lengths"].clamp(min=1)
    shift_c, shift_r = pc - rc, pr - rr
    gap = shift_c - shift_r
    out = {
        "pairs": len(pc),
        "beta": beta,
        "reward_accuracy": (gap > 0).float().mean(),
        "reward_margin": beta * gap.mean(),
        "reward_chosen": beta * shift_c.mean(),
        "reward_rejected": beta * shift_r.mean(),
        "logps_shift_chosen": shift_c.mean(),
        "logps_shift_rejected": shift_r.mean(),
        "logps_chosen": pc.mean(),
        "logps_rejected": pr.mean(),
        "reference_logps_chosen": rc.mean(),
        "reference_logps_rejected": rr.mean(),
        "kl": scores["kl_chosen"].mean(),
        "kl_rejected": scores["kl_rejected"].mean(),
        "kl_per_token": scores["kl_chosen"].sum() / lc.sum(),
        "kl_reverse": scores["kl_reverse_chosen"].mean(),
        "policy_prefers_chosen": (pc / lc > pr / lr).float().mean(),
        "reference_prefers_chosen": (rc / lc > rr / lr).float().mean(),
        "logp_margin": (pc / lc - pr / lr).mean(),
        "reference_logp_margin": (rc / lc - rr / lr).mean(),
    }
    if loss_fn is not None:
        inputs = LossInputs(
            policy_chosen_logps=pc,
            policy_rejected_logps=pr,
            chosen_lengths=scores["chosen_lengths"],
            rejected_lengths=scores["rejected_lengths"],
            reference_chosen_logps=rc,
            reference_rejected_logps=rr,
            chosen_kl=scores["kl_reverse_chosen"],  # the loss contract's KL(pi_ref || pi)
            rejected_kl=scores["kl_reverse_rejected"],
        )
        out["loss"] = loss_fn(inputs, **(loss_args or {})).loss
    return {key: float(value) if isinstance(value, torch.Tensor) else value for key, value in out.items()}


def pair_batches(examples: list, tokenizer, max_length: int, max_prompt_length: int | None, batch_size: int):
    from prefopt.data import PairExample, PreferenceCollator, PreferenceTokenizer

    if not examples or not isinstance(examples[0], PairExample):
        raise PrefoptError("eval --data needs paired data (prompt/chosen/rejected)")
    tokenizing = PreferenceTokenizer(tokenizer, max_length, max_prompt_length)
    items = tokenizing.all(examples)
    collate = PreferenceCollator(tokenizer.pad_token_id)
    return [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)], tokenizing.report


def winning(policy: float | None, reference: float | None) -> float | None:
    """1 for a win of the policy, 1/2 for a tie, 0 for a loss; None where either is unscored."""
    if policy is None or reference is None:
        return None
    return 1.0 if policy > reference else 0.5 if policy == reference else 0.0


def _mean(values) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _absolute_rewards(reward, prompts: list, samples: list, score_samples) -> list | None:
    """Each completion's reward. A pairwise judge scores one completion against a column (its
    `against`); when the prompts carry none, only the comparison of the two models' answers (the
    win rate) is measured, and the mean rewards are left out (None)."""
    from prefopt.rewards.registry import RewardError

    try:
        return score_samples(reward, prompts, samples)[0]
    except RewardError:
        if reward.compare is None:
            raise
        return None


def generation_metrics(policy, reference, tokenizer, prompts: list, reward, settings) -> dict:
    """Both models answer `prompts`; mean rewards, the policy's win rate, lengths and one example."""
    from prefopt.models.rollout import sample_prompts, score_samples

    policy_samples = sample_prompts(policy, tokenizer, prompts, settings)
    reference_samples = sample_prompts(reference, tokenizer, prompts, settings)
    policy_rewards = _absolute_rewards(reward, prompts, policy_samples, score_samples)
    reference_rewards = _absolute_rewards(reward, prompts, reference_samples, score_samples)
    flat = lambda groups: [x for group in groups for x in group] if groups is not None else []  # noqa: E731
    if reward.compare is not None:  # a pairwise judge: P(policy's answer beats the reference's)
        rows = [(p, a, b) for p, ga, gb in zip(prompts, policy_samples, reference_samples, strict=True)
                for a, b in zip(ga.completions, gb.completions, strict=True)]  # fmt: skip
        columns = {name: [p.columns.get(name) for p, _, _ in rows] for name in {n for p in prompts for n in p.columns}}
        wins = reward.compare(
            [p.prompt for p, _, _ in rows], [a for _, a, _ in rows], [b for _, _, b in rows], **columns
        )
    else:
        wins = [winning(a, b) for a, b in zip(flat(policy_rewards), flat(reference_rewards), strict=True)]
    lengths = lambda samples: [len(ids) for s in samples for ids in s.completion_ids]  # noqa: E731
    return {
        "prompts": len(prompts),
        "samples_per_prompt": settings.num_samples,
        "reward": reward.name,
        "reward_policy": _mean(flat(policy_rewards)),
        "reward_reference": _mean(flat(reference_rewards)),
        "win_rate": _mean(wins),
        **win_rate_statistics(wins, settings.num_samples),
        "ties": sum(w == 0.5 for w in wins if w is not None),
        "unscored": sum(w is None for w in wins),
        "length_policy": _mean(lengths(policy_samples)),
        "length_reference": _mean(lengths(reference_samples)),
        "example": _example(prompts, policy_samples, reference_samples, wins, settings.num_samples),
    }


def _example(prompts: list, policy_samples: list, reference_samples: list, wins: list, per_prompt: int) -> dict:
    """One prompt's two answers, to show: the first where the policy's answer wins (so the example
    shows what training changed), else the first prompt."""
    won = next((i for i, w in enumerate(wins) if w == 1.0), None)
    prompt, sample = (0, 0) if won is None else divmod(won, per_prompt)
    return {
        "prompt": prompts[prompt].prompt,
        "policy": policy_samples[prompt].completions[sample],
        "reference": reference_samples[prompt].completions[sample],
        "policy_won": won is not None,
    }


def evaluate(
    model: str,
    reference: str | None = None,
    data: list | None = None,
    prompts: list | None = None,
    reward=None,
    max_length: int = 1024,
    max_prompt_length: int | None = None,
    batch_size: int = 8,
    loss: str | None = None,
    beta: float | None = None,
    limit: int | None = None,
    sample_settings=None,
    dtype: str = "float32",
    chunk_size: int = 1024,
    against: str | None = None,
) -> dict:
    """One dict: what was compared, the held-out pair numbers (with `data`) and the sampled
    answers' rewards (with `prompts` and a configured `reward`, see prefopt.rewards.get_reward).

    `against`: another model (a folder, a run or its final/) whose sampled answers the model's
    are compared with (A/B), in place of the reference's; the pair numbers keep the reference."""
    from prefopt.data import load_examples
    from prefopt.data.formats import load_prompts
    from prefopt.models.inference import load_for_inference
    from prefopt.models.quiet_logs import quiet_loading_bars
    from prefopt.models.rollout import SampleSettings

    if not data and not prompts:
        raise PrefoptError("eval needs --data FILE (held-out pairs) or --prompts FILE with --reward NAME")
    if prompts and reward is None:
        raise PrefoptError("eval --prompts needs --reward NAME (`prefopt rewards` lists them)")
    if against and not prompts:
        raise PrefoptError("eval --against compares sampled answers: pass --prompts FILE with --reward NAME")
    models = resolve_models(model, reference)
    loss_name, loss_fn, loss_args, beta = _loss_for(models.run_config, loss, beta)
    examples = load_examples(data)[0][:limit] if data else []  # bad data fails before any model loads
    prompt_examples = load_prompts(prompts)[0][:limit] if prompts else []
    with quiet_loading_bars():
        policy_model, tokenizer = load_for_inference(models.model, dtype=dtype)
        reference_model, _ = load_for_inference(models.reference, dtype=dtype)
        opponent = _model_folder(against) if against else None
        opponent_model = load_for_inference(opponent, dtype=dtype)[0] if opponent else reference_model
    if policy_model.get_output_embeddings().weight.shape != reference_model.get_output_embeddings().weight.shape:
        raise PrefoptError(f"{models.model} and {models.reference} have different vocabularies; pass --reference")
    if (
        opponent
        and policy_model.get_output_embeddings().weight.shape != opponent_model.get_output_embeddings().weight.shape
    ):
        raise PrefoptError(
            f"{models.model} and {opponent} have different vocabularies: their answers cannot be compared"
        )
    result: dict = {"model": models.model, "reference": models.reference}
    if opponent:
        result["against"] = opponent
    if examples:
        batches, report = pair_batches(examples, tokenizer, max_length, max_prompt_length, batch_size)
        scores = score_pairs(policy_model, reference_model, batches, chunk_size)
        result.update(pair_metrics(scores, beta, loss_fn, loss_args), loss_name=loss_name)
        result["truncated"], result["dropped"] = report.truncated, report.dropped_too_long
    if prompt_examples:
        settings = sample_settings or SampleSettings(num_samples=1, max_new_tokens=64, temperature=0.0)
        generation = generation_metrics(policy_model, opponent_model, tokenizer, prompt_examples, reward, settings)
        generation["opponent"] = "against" if opponent else "reference"
        result["generation"] = generation
    return result


def _model_folder(model: str) -> str:
    """A run folder's final/, else the folder as given."""
    run = _run_folder(model)
    return str(run / "final") if run is not None and Path(model) == run else model


def _prompt_text(prompt) -> str:
    """A prompt as text: conversational prompts show their last message."""
    return prompt[-1].get("content", "") if isinstance(prompt, list) and prompt else str(prompt)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_result(result: dict) -> str:
    """The plain-text report of `evaluate`."""
    lines = [f"policy:    {result['model']}", f"reference: {result['reference']}"]
    if result.get("against"):
        lines.append(f"against:   {result['against']} (A/B: sampled answers against this model's)")
    if "pairs" in result:
        cut = f", {result['truncated']} truncated, {result['dropped']} dropped" if result.get("dropped") else ""
        lines.append(f"\nheld-out pairs: {result['pairs']} (beta {result['beta']:g}, loss {result['loss_name']}{cut})")
        lines += [f"  {label:<46}{_fmt(result.get(key)):>10}" for key, label in PAIR_LINES]
    generation = result.get("generation")
    if generation:
        lines.append(
            f"\nsampled answers: {generation['prompts']} prompts x {generation['samples_per_prompt']}, "
            f"reward {generation['reward']}"
        )
        ab = generation.get("opponent") == "against"  # A/B: the answers are the --against model's
        other = "--against model" if ab else "reference"
        lines += [
            f"  {label.replace('reference', other):<46}{_fmt(generation.get(key)):>10}"
            for key, label in GENERATION_LINES
        ]
        if generation.get("win_rate_ci95"):
            low, high = generation["win_rate_ci95"]
            lines.append(f"  {'win rate, 95% interval (Wilson, over prompts)':<46}{f'{low:.3f}-{high:.3f}':>10}")
            lines.append(f"  {'sign test p (two-sided, ties left out)':<46}{_fmt(generation['sign_test_p']):>10}")
        if generation["ties"] or generation["unscored"]:
            lines.append(f"  ({generation['ties']} ties counted 1/2, {generation['unscored']} unscored left out)")
        example = generation["example"]
        lines.append(f"\n  prompt:    {_prompt_text(example['prompt'])[:200]!r}")
        lines.append(f"  policy:    {example['policy'][:200]!r}")
        lines.append(f"  {'against:' if ab else 'reference:':<11}{example['reference'][:200]!r}")
    return "\n".join(lines)
