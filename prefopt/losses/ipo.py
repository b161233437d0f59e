"""IPO: Identity Preference Optimization.

Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from
Human Preferences", Eq. 17: a squared loss that regresses the log-ratio margin to
1 / (2 beta) (beta is the paper's tau), so it cannot over-fit deterministic preferences.
"""

from prefopt.losses import checks
from prefopt.losses._common import log_ratios, reward_metrics
from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "ipo",
    needs_lengths=True,
    checks={"beta": checks.positive},
    description="Identity Preference Optimization (Azar et al. 2023): squared margin regression to 1/(2 beta)",
)
def ipo_loss(inputs: LossInputs, *, beta: float = 0.1, length_normalize: bool = True) -> LossOutput:
    """IPO, Azar et al. 2023, Eq. 17.

    h = (pi_c - ref_c) - (pi_r - ref_r);  loss_i = (h - 1 / (2 beta))^2

    With length_normalize=True (default, as TRL does for IPO) every log-prob is the
    mean over completion tokens instead of the sum, which keeps 1/(2 beta) on a
    sensible scale for long completions.
    """
    chosen, rejected = log_ratios(inputs)
    if length_normalize:
        chosen = chosen / inputs.chosen_lengths.clamp(min=1)
        rejected = rejected / inputs.rejected_lengths.clamp(min=1)
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return LossOutput(losses.mean(), reward_metrics(beta * chosen, beta * rejected))
