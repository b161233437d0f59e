"""`implicit`: a finished prefopt run as a reward model, r = beta * (log pi(y|x) - log pi_ref(y|x)).

DPO's policy defines the reward it was trained to prefer (Rafailov et al. 2023, Eq. 5, up to
a per-prompt constant that cancels in any comparison of completions of one prompt). pi is the
run's final/, pi_ref the reference it was trained against: its --reference-model when it named
one, else the model it started from (for a LoRA run: the same model with its adapter switched
off), beta the run's own. Completions are tokenized exactly as the run's
training tokenized them (prefopt's tokenizer, one EOS), and scored by the same log-prob code.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from prefopt.rewards.registry import RewardError, register_reward


def _run_folder(run: str) -> Path:
    folder = Path(run)
    if folder.name == "final":
        folder = folder.parent
    if not (folder / "config.yaml").is_file() or not (folder / "final").is_dir():
        raise RewardError(f"implicit: {run} is not a finished prefopt run (needs config.yaml and final/)")
    return folder


def run_beta(config: dict) -> float:
    """The run's beta: its loss_args, else its loss's default, else 0.1."""
    beta = (config.get("loss_args") or {}).get("beta")
    if beta is None:
        from prefopt.losses import get_loss_spec

        beta = get_loss_spec(config.get("loss", "dpo")).hyperparameters.get("beta", 0.1)
    return float(beta)


@register_reward("implicit")
class ImplicitReward:
    """beta * (log pi - log pi_ref) of a finished prefopt run (its folder or final/)."""

    def __init__(self, run: str, beta: float | None = None, batch_size: int = 8, dtype: str = "auto"):
        from prefopt.data.collate import PreferenceCollator
        from prefopt.data.tokenize import PreferenceTokenizer
        from prefopt.models.inference import is_adapter, load_for_inference

        folder = _run_folder(run)
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        self.beta = run_beta(config) if beta is None else float(beta)
        final = str(folder / "final")
        if is_adapter(final):
            from peft import PeftModel

            base, self.tokenizer = load_for_inference(config["model"], dtype=dtype)
            self.policy = PeftModel.from_pretrained(base, final).eval()
        else:
            self.policy, self.tokenizer = load_for_inference(final, dtype=dtype)
        # The reference the run was trained against: --reference-model when it named one (every
        # iterative round names pi_0, LoRA rounds too), else its start, which for a LoRA run is the
        # policy with its adapter disabled (None: no second model).
        named = config.get("reference_model")
        self.reference = None
        if named or not is_adapter(final):
            self.reference, _ = load_for_inference(named or config["model"], dtype=dtype)
        # tokenized as the run's training tokenized: its budgets, the prompt cut to its end
        self.tokenizing = PreferenceTokenizer(
            self.tokenizer, int(config.get("max_length", 512)), config.get("max_prompt_length")
        )
        self.collate = PreferenceCollator(self.tokenizer.pad_token_id)
        self.batch_size = batch_size
        self.device = next(self.policy.parameters()).device

    def _logps(self, model, batch) -> torch.Tensor:
        from prefopt.models.logps import score_model

        (logps, _, _), _, _ = score_model(model, batch)
        return logps

    @torch.no_grad()
    def __call__(self, prompts, completions, **columns):
        from prefopt.data.formats import SingleExample

        examples = [
            SingleExample(p, c, True, f"completion {i}")
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
        ]
        items = [self.tokenizing.single(example, i) for i, example in enumerate(examples)]
        scores: list[float | None] = [None] * len(items)  # None: the prompt alone is too long
        kept = [i for i, item in enumerate(items) if item is not None]
        for start in range(0, len(kept), self.batch_size):
            rows = kept[start : start + self.batch_size]
            batch = self.collate([items[i] for i in rows]).to(self.device)
            policy = self._logps(self.policy, batch)
            if self.reference is None:
                with self.policy.disable_adapter():
                    reference = self._logps(self.policy, batch)
            else:
                reference = self._logps(self.reference, batch)
            for i, value in zip(rows, (self.beta * (policy - reference)).tolist(), strict=True):
                scores[i] = value
        return scores
