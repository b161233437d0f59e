"""SFT: supervised fine-tuning on the desirable completions (rejection sampling's training step).

Best-of-N / rejection sampling (e.g. RAFT, Dong et al. 2023; Llama 2's rejection-sampling
fine-tuning, Touvron et al. 2023 §3.2.2) keeps the best of N sampled answers and fine-tunes on
them with the ordinary language-modelling loss, so `prefopt pairs --best-of-n` writes unpaired
data whose every example is desirable, and this loss trains on it with the same trainer.
"""

from prefopt.losses.base import LossInputs, LossOutput
from prefopt.losses.registry import register_loss


@register_loss(
    "sft",
    needs_reference=False,
    needs_lengths=True,
    paired=False,
    description="supervised fine-tuning: mean token NLL of the desirable completions (no reference)",
)
def sft_loss(inputs: LossInputs) -> LossOutput:
    """Mean negative log-likelihood per completion token of the desirable (chosen) side:

        loss = -sum_i log pi(y_i | x_i) / sum_i |y_i|      over desirable examples i

    i.e. every token of the micro-batch weighs the same (as TRL's SFTTrainer averages over the
    batch's completion tokens). Undesirable examples (label false) take no part; a micro-batch
    with none desirable gives 0 with no gradient. Paired files feed it their chosen answers.
    """
    logps, lengths = inputs.policy_chosen_logps, inputs.chosen_lengths
    tokens = lengths.sum()
    loss = -logps.sum() / tokens.clamp(min=1)
    metrics = {"nll_per_token": loss.detach()}
    if logps.numel():
        metrics["logps/per_token"] = (logps.detach().sum() / tokens.clamp(min=1)).detach()
    return LossOutput(loss, metrics)
