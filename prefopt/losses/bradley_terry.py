"""Bradley-Terry: train a reward model (a sequence classifier with one output) on preference pairs.

Bradley & Terry, 1952: P(chosen beats rejected) = sigma(r_c - r_r). Ouyang et al. 2022
(InstructGPT), Eq. 1, fits a reward model r by minimising -log sigma(r_c - r_r). The margin and the
centering term are TRL's RewardTrainer (1.x, `compute_loss`): Touvron et al. 2023 (Llama 2) subtract
a margin inside the sigmoid; Eisenstein et al. 2023 (arXiv 2312.09244, Eq. 2) add
coef * mean((r_c + r_r)^2) to keep rewards centred on zero.

The trainer serves `needs_sequence_scores` by loading the model as a sequence classifier
(num_labels=1) and scoring each sequence at its last real token; the run's final/ is then a reward
model for the `reward_model` reward.
"""

import math

import torch.nn.functional as F

from prefopt.losses import checks
from prefopt.losses._common import reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


def _finite(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    return None


@register_loss(
    "bradley_terry",
    needs_reference=False,
    needs_sequence_scores=True,
    checks={"margin": _finite, "center_rewards_coefficient": checks.optional(checks.non_negative)},
    description="Bradley-Terry reward model (a sequence classifier's scores), as TRL's RewardTrainer",
)
def bradley_terry_loss(
    inputs: LossInputs, *, margin: float = 0.0, center_rewards_coefficient: float | None = None
) -> LossOutput:
    """Bradley-Terry reward-model loss, TRL RewardTrainer's form.

    r_c, r_r = the classifier's scores of the chosen and rejected sequences
    loss = mean_i[-log sigma(r_c - r_r - margin)] + coef * mean_i[(r_c + r_r)^2]

    Defaults: margin=0.0, center_rewards_coefficient=None (off; TRL's default; 0.0 is off too).
    The margin is one constant for every pair: TRL's per-example `margin` column is not read.
    Metrics: the scores are the rewards (rewards/chosen, rewards/rejected, rewards/margins =
    mean(r_c - r_r), rewards/accuracies = share of pairs with r_c > r_r, ties counting as wrong).
    """
    chosen, rejected = inputs.chosen_scores, inputs.rejected_scores
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return LossOutput(loss, reward_metrics(chosen, rejected))
