"""Policy-gradient losses against hand-computed float64 values and against TRL 1.x's own code."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from prefopt.losses import LossError, LossInputs, get_loss, get_loss_spec
from prefopt.losses._policy_gradient import clipped_surrogate


def t(*values, dtype=torch.float64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def close(actual, expected, tol=1e-12):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    assert torch.allclose(actual, torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=0), (actual, expected)


def rollout_inputs(token_logps, ref, rows, rewards, groups, old=None, baseline=None, max_len=None):
    """LossInputs as the trainer builds them: completions on the chosen side, tokens flat."""
    rows = torch.tensor(rows)
    n = len(rewards)
    sums = torch.zeros(n, dtype=token_logps.dtype).index_add(0, rows, token_logps)
    kind = token_logps.dtype
    lengths = torch.zeros(n, dtype=kind).index_add(0, rows, torch.ones(len(rows), dtype=kind))
    ref_sums = torch.zeros(n, dtype=kind).index_add(0, rows, ref) if ref is not None else None
    return LossInputs(
        policy_chosen_logps=sums,
        policy_rejected_logps=sums[:0],
        chosen_lengths=lengths,
        rejected_lengths=lengths[:0],
        reference_chosen_logps=ref_sums,
        reference_rejected_logps=ref_sums[:0] if ref_sums is not None else None,
        token_logps=token_logps,
        reference_token_logps=ref,
        old_token_logps=old,
        token_rows=rows,
        rewards=t(*rewards, dtype=kind),
        groups=torch.tensor(groups),
        baseline_rewards=t(*baseline, dtype=kind) if baseline else None,
        max_completion_length=max_len,
    )


# One group of two completions: row 0 has tokens 0, 1 and reward 1; row 1 has token 2 and reward 0.
LOGPS = (-1.0, -0.5, -2.0)
REF = (-1.2, -0.5, -1.0)
A = 0.5 / (math.sqrt(0.5) + 1e-4)  # mean 0.5, Bessel std sqrt(2 * 0.25 / 1); A = (+a, -a)
K3 = (math.exp(-0.2) + 0.2 - 1, 0.0, math.exp(1.0) - 2)  # e^(ref-logp) - (ref-logp) - 1
DK3 = (1 - math.exp(-0.2), 0.0, 1 - math.exp(1.0))  # d k3 / d logp = 1 - e^(ref-logp)


def grpo_inputs(**kwargs):
    return rollout_inputs(t(*LOGPS, grad=True), t(*REF), [0, 0, 1], [1.0, 0.0], [0, 0], **kwargs)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_values_and_gradients(loss_type):
    # per token (rho == 1): -A_row + 0.04 k3: (-a + 0.04 K3[0], -a, a + 0.04 K3[2])
    beta = 0.04
    per_token = [-A + beta * K3[0], -A + beta * K3[1], A + beta * K3[2]]
    inputs = grpo_inputs(max_len=4)
    out = get_loss("grpo")(inputs, loss_type=loss_type, beta=beta)
    if loss_type == "grpo":  # mean over a completion's tokens, then over completions
        expected = ((per_token[0] + per_token[1]) / 2 + per_token[2]) / 2
        weights = [1 / 4, 1 / 4, 1 / 2]
    elif loss_type == "dr_grpo":  # sum / (2 completions * max_completion_length 4)
        expected, weights = sum(per_token) / 8, [1 / 8] * 3
    else:  # bnpo, dapo: mean over the 3 tokens
        expected, weights = sum(per_token) / 3, [1 / 3] * 3
    close(out.loss, expected)
    out.loss.backward()
    # d/d logp of -rho A with rho = e^(logp - sg(logp)) is -A; plus beta dk3/dlogp
    grads = [-A + beta * DK3[0], -A + beta * DK3[1], A + beta * DK3[2]]
    close(inputs.token_logps.grad, [w * g for w, g in zip(weights, grads, strict=True)])
    close(out.metrics["reward"], 0.5)
    close(out.metrics["reward_std"], math.sqrt(0.5))
    close(out.metrics["kl"], sum(K3) / 3)
    close(out.metrics["completion_length"], 1.5)
    assert out.metrics["clip_ratio"] == 0 and out.metrics["equal_groups"] == 0


def test_dr_grpo_is_unscaled_advantages_and_constant_normaliser():
    inputs = grpo_inputs(max_len=4)
    out = get_loss("grpo")(inputs, loss_type="dr_grpo", scale_rewards="none", beta=0.0)
    # A = (0.5, -0.5): per token (-0.5, -0.5, 0.5), sum -0.5, / (2 * 4)
    close(out.loss, -0.5 / 8)


def test_clipped_surrogate_hand_values():
    # rho = e^0.5 = 1.6487 > 1.2 with A = 1: loss -1.2, clipped; rho = e^-0.5 = 0.6065 < 0.8 with A = -1:
    # min(-0.6065, -0.8) = -0.8 -> loss 0.8, clipped; rho = e^0.1 = 1.105 with A = 2: inside, loss -2.2103
    # epsilon_high 0.28 moves the upper clip: rho 1.6487 -> 1.28
    log_ratio = t(0.5, -0.5, 0.1, grad=True)
    loss, active = clipped_surrogate(log_ratio, t(1.0, -1.0, 2.0), 0.2, None)
    close(loss, [-1.2, 0.8, -2 * math.exp(0.1)])
    assert active.tolist() == [True, True, False]
    loss.sum().backward()
    close(log_ratio.grad, [0.0, 0.0, -2 * math.exp(0.1)])  # clipped tokens give no gradient
    loss, _ = clipped_surrogate(t(0.5), t(1.0), 0.2, 0.28)
    close(loss, [-1.28])
    # the clip does not hold where it would not lower the objective: rho 1.65 with A < 0
    loss, active = clipped_surrogate(t(0.5), t(-1.0), 0.2, None)
    close(loss, [math.exp(0.5)])
    assert not active.any()


def test_grpo_clip_ratio_with_old_logps():
    # old logps 0.5 below the current on token 0 (row 0, A > 0): rho = e^0.5 clipped; others rho = 1
    old = t(LOGPS[0] - 0.5, LOGPS[1], LOGPS[2])
    out = get_loss("grpo")(grpo_inputs(old=old), loss_type="bnpo", beta=0.0)
    close(out.loss, (-1.2 * A - A + A) / 3)
    close(out.metrics["clip_ratio"], 1 / 3)


def test_all_equal_group_gives_zero_loss_no_nan():
    inputs = rollout_inputs(t(*LOGPS, grad=True), t(*LOGPS), [0, 0, 1], [0.5, 0.5], [0, 0])
    out = get_loss("grpo")(inputs)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.isfinite(inputs.token_logps.grad).all() and inputs.token_logps.grad.eq(0).all()
    assert out.metrics["equal_groups"] == 1


def test_rloo_kl_in_reward_sequence_level():
    # rows: 0 -> tokens 0, 1; 1 -> token 2; 2 -> token 3; one group; rewards (1, 0, 0)
    # k1 per token (logp - ref): (0.2, 0, -1, 0.5): per completion (0.2, -1, 0.5)
    # R' = R - 0.1 * kl = (0.98, 0.1, -0.05); A_0 = 0.98 - (0.1 - 0.05)/2 = 0.955
    # A_1 = 0.1 - (0.98 - 0.05)/2 = -0.365; A_2 = -0.05 - (0.98 + 0.1)/2 = -0.59
    logps = t(-1.0, -0.5, -2.0, -0.5, grad=True)
    inputs = rollout_inputs(logps, t(-1.2, -0.5, -1.0, -1.0), [0, 0, 1, 2], [1.0, 0.0, 0.0], [0, 0, 0])
    out = get_loss("rloo")(inputs, beta=0.1)
    advantages = [0.955, -0.365, -0.59]
    close(out.loss, -sum(advantages) / 3)  # rho == 1
    out.loss.backward()
    close(logps.grad, [-advantages[0] / 3, -advantages[0] / 3, -advantages[1] / 3, -advantages[2] / 3])
    close(out.metrics["kl"], (0.2 - 1 + 0.5) / 4)


def test_remax_greedy_baseline():
    # two prompts (groups), one sample each; rewards (1, 0), greedy rewards (0.25, 0.5); beta 0 (no KL)
    # A = (0.75, -0.5); loss = -(0.75 - 0.5)/2
    logps = t(-1.0, -0.5, -2.0, grad=True)
    inputs = rollout_inputs(logps, t(*REF), [0, 0, 1], [1.0, 0.0], [0, 1], baseline=[0.25, 0.5])
    out = get_loss("remax")(inputs, beta=0.0)
    close(out.loss, -0.125)
    out.loss.backward()
    close(logps.grad, [-0.375, -0.375, 0.25])
    with pytest.raises(LossError, match="baseline_rewards"):
        get_loss("remax")(rollout_inputs(t(*LOGPS), t(*REF), [0, 0, 1], [1.0, 0.0], [0, 1]))


def test_reinforce_pp_whitened_kl_penalised_returns():
    # as tests/losses/test_advantages.py: rows [1, 1, 0, 0, 0], scores (1, 0), beta 0.1:
    # returns (-0.02, 0, 1, 1.05, 1), mean 0.606, Bessel var 0.31668; loss = token mean of -A = 0
    logps = t(-0.5, -1.0, -1.0, -2.0, -0.5, grad=True)
    inputs = rollout_inputs(logps, t(-0.7, -1.0, -1.5, -1.5, -0.5), [1, 1, 0, 0, 0], [1.0, 0.0], [0, 1])
    out = get_loss("reinforce_pp")(inputs, beta=0.1)
    std = math.sqrt(0.31668 + 1e-8)
    advantages = [(g - 0.606) / std for g in (-0.02, 0.0, 1.0, 1.05, 1.0)]
    close(out.loss, -sum(advantages) / 5)
    out.loss.backward()
    close(logps.grad, [-a / 5 for a in advantages])


def test_declared_needs():
    assert get_loss_spec("grpo").needs == ["reference", "rollouts"]
    assert get_loss_spec("remax").needs == ["reference", "rollouts", "greedy_baseline"]
    assert not get_loss_spec("grpo").paired
    with pytest.raises(LossError, match="loss_type"):
        get_loss("grpo")(grpo_inputs(), loss_type="sum")
    with pytest.raises(LossError, match="needs reference_"):
        get_loss("grpo")(rollout_inputs(t(*LOGPS), None, [0, 0, 1], [1.0, 0.0], [0, 0]))


# -- against TRL 1.x GRPOTrainer's own loss code ---------------------------------------------------


class _TrlSelf:
    """The attributes GRPOTrainer._compute_loss reads, with the model's forward replaced by given log-probs."""

    def __init__(self, per_token_logps, loss_type, beta, epsilon, epsilon_high, max_len):
        self._logps = per_token_logps
        self.loss_type, self.beta, self.epsilon_low, self.epsilon_high = loss_type, beta, epsilon, epsilon_high
        self.max_completion_length = max_len
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.importance_sampling_level = "token"
        self.use_vllm = False
        self.aux_loss_enabled = False
        self._entropy_bonus_enabled = False
        self.current_gradient_accumulation_steps = 1
        self.model = SimpleNamespace(training=True)
        self.args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
        self.accelerator = SimpleNamespace(
            num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x, gather_for_metrics=lambda x: x
        )
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return self._logps, torch.zeros_like(self._logps), None


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_matches_trl(loss_type):
    pytest.importorskip("trl.trainer.grpo_trainer")
    torch.manual_seed(0)
    lengths = [3, 1, 4, 2, 4, 3]  # 2 prompts x G = 3; padded to 4
    rewards = [1.0, 0.0, 0.5, 0.0, 0.0, 1.0]
    groups = [0, 0, 0, 1, 1, 1]
    n, width = len(lengths), max(lengths)
    mask = torch.tensor([[1] * k + [0] * (width - k) for k in lengths], dtype=torch.long)
    logps = -torch.rand(n, width, dtype=torch.float64) * 3
    ref = logps + torch.randn(n, width, dtype=torch.float64) * 0.3
    old = logps + torch.randn(n, width, dtype=torch.float64) * 0.3  # some ratios clip
    beta, epsilon, epsilon_high, max_len = 0.04, 0.2, 0.28, 5
    from prefopt.losses._advantages import grpo_advantages

    advantages = grpo_advantages(t(*rewards), torch.tensor(groups))

    trl_loss, trl_grad, fake = _trl_loss(
        loss_type, "token", logps, ref, old, mask, advantages, beta, epsilon, epsilon_high, max_len
    )

    keep = mask.bool()
    flat = logps[keep].clone().requires_grad_(True)
    rows = torch.arange(n)[:, None].expand(n, width)[keep].tolist()
    inputs = rollout_inputs(flat, ref[keep], rows, rewards, groups, old=old[keep], max_len=max_len)
    ours = get_loss("grpo")(inputs, loss_type=loss_type, beta=beta, epsilon=epsilon, epsilon_high=epsilon_high)
    ours.loss.backward()

    close(ours.loss, trl_loss.detach(), tol=1e-12)
    close(flat.grad, trl_grad[keep], tol=1e-12)
    close(ours.metrics["kl"], fake._metrics["train"]["kl"][0], tol=1e-12)
    close(ours.metrics["clip_ratio"], fake._metrics["train"]["clip_ratio/region_mean"][0], tol=1e-7)  # TRL: float32
    assert 0 < ours.metrics["clip_ratio"] < 1  # the comparison covered clipped and unclipped tokens


@pytest.mark.parametrize("name", ["grpo", "rloo", "remax", "reinforce_pp"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(name, dtype):
    def inputs(kind):
        logps = t(-1.0, -0.5, -2.0, -3.0, dtype=kind)
        return rollout_inputs(
            logps, t(-1.2, -0.5, -1.0, -3.5, dtype=kind), [0, 0, 1, 2], [1.0, 0.0, 0.5], [0, 0, 0], baseline=[0.5] * 3
        )

    out = get_loss(name)(inputs(dtype))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert torch.allclose(out.loss, get_loss(name)(inputs(torch.float32)).loss, atol=1e-2)
    assert all(math.isfinite(float(v)) for v in out.metrics.values())


# -- GSPO and CISPO: hand values with rho != 1, and TRL 1.x's own code ------------------------------


def test_gspo_sequence_ratio_by_hand():
    """One group of two completions (rewards 1, 0: A = +-a, a = 0.5 / (sqrt(0.5) + 1e-4)).
    Row 0: tokens 0, 1 with log-ratios logp - old = (0.1, -0.3): s_0 = e^(-0.1) = 0.904837, below
    1 - 3e-4; A > 0 so min(s A, clip(s) A) = s A: loss_0 = -a s_0. Row 1: token 2 with log-ratio
    0.2: s_1 = e^0.2 = 1.221403 above 1 + 4e-4; A < 0 so min(-a s, -a 1.0004) = -a s_1 (unclipped,
    the larger magnitude): loss_1 = a s_1. loss = (-a s_0 + a s_1) / 2.
    Gradients: d loss / d logp_t = A s / (2 |y|): row 0's tokens -a s_0 / 4 each, row 1's a s_1 / 2.
    No clip was active (the unclipped term won both times): clip_ratio 0."""
    old = t(LOGPS[0] - 0.1, LOGPS[1] + 0.3, LOGPS[2] - 0.2)
    inputs = grpo_inputs(old=old)
    out = get_loss("gspo")(inputs)
    s0, s1 = math.exp(-0.1), math.exp(0.2)
    close(out.loss, (-A * s0 + A * s1) / 2)
    out.loss.backward()
    close(inputs.token_logps.grad, [-A * s0 / 4, -A * s0 / 4, A * s1 / 2])
    close(out.metrics["clip_ratio"], 0.0)


def test_gspo_clip_holds_a_sequence_and_kl_is_a_per_completion_mean():
    """Row 0 with log-ratios (0.3, 0.3): s_0 = e^0.3 > 1 + 4e-4 and A > 0: the clipped term wins,
    loss_0 = -a (1 + 4e-4) with no gradient; row 1 unchanged from above (s_1 = 1: old = logp).
    beta 0.1 adds beta * mean_t k3 per completion: (K3_0 + K3_1) / 2 for row 0, K3_2 for row 1."""
    old = t(LOGPS[0] - 0.3, LOGPS[1] - 0.3, LOGPS[2])
    inputs = grpo_inputs(old=old)
    out = get_loss("gspo")(inputs, beta=0.1)
    expected = (-A * (1 + 4e-4) + 0.1 * (K3[0] + K3[1]) / 2 + A * 1.0 + 0.1 * K3[2]) / 2
    close(out.loss, expected)
    out.loss.backward()
    close(inputs.token_logps.grad, [0.1 * DK3[0] / 4, 0.1 * DK3[1] / 4, A / 2 + 0.1 * DK3[2] / 2])
    close(out.metrics["clip_ratio"], 0.5)  # one of two completions held by the clip


def test_cispo_clipped_weight_by_hand():
    """Token log-ratios (1.8, 0.0, -0.5): rho = (e^1.8 = 6.0496, 1, e^-0.5); the weight sg(min(rho, 5))
    = (5, 1, e^-0.5). A = (a, a, -a) by token. Per token -w A logp, mean over the 3 tokens:
    loss = -(5 a (-1.0) + a (-0.5) - e^-0.5 a (-2.0)) / 3; gradient -w A / 3 per token (the capped
    token keeps its gradient, at weight 5). clip_ratio: 1 of 3 tokens over the cap with A > 0."""
    old = t(LOGPS[0] - 1.8, LOGPS[1], LOGPS[2] + 0.5)
    inputs = grpo_inputs(old=old)
    out = get_loss("cispo")(inputs)
    w = (5.0, 1.0, math.exp(-0.5))
    adv = (A, A, -A)
    close(out.loss, sum(-wi * ai * li for wi, ai, li in zip(w, adv, LOGPS, strict=True)) / 3)
    out.loss.backward()
    close(inputs.token_logps.grad, [-wi * ai / 3 for wi, ai in zip(w, adv, strict=True)])
    close(out.metrics["clip_ratio"], 1 / 3)


def _trl_loss(loss_type, level, logps, ref, old, mask, advantages, beta, epsilon, epsilon_high, max_len=5):
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    n, width = logps.shape
    trl_logps = logps.clone().requires_grad_(True)
    fake = _TrlSelf(trl_logps, loss_type, beta, epsilon, epsilon_high, max_len)
    fake.importance_sampling_level = level
    trl_inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, width, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum().double(),
    }
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, trl_inputs)
    loss.backward()
    return loss.detach(), trl_logps.grad, fake


@pytest.mark.parametrize("name", ["gspo", "cispo"])
def test_gspo_and_cispo_match_trl(name):
    """GSPO = TRL's importance_sampling_level="sequence" with loss_type="grpo"; CISPO = TRL's
    loss_type="cispo" (its epsilon_high is our epsilon_max). Old log-probs differ from the current
    ones so ratios leave the clip range; loss and gradient equal to 1e-12 in float64."""
    torch.manual_seed(1)
    lengths, rewards, groups = [3, 1, 4, 2, 4, 3], [1.0, 0.0, 0.5, 0.0, 0.0, 1.0], [0, 0, 0, 1, 1, 1]
    n, width = len(lengths), max(lengths)
    mask = torch.tensor([[1] * k + [0] * (width - k) for k in lengths], dtype=torch.long)
    logps = -torch.rand(n, width, dtype=torch.float64) * 3
    ref = logps + torch.randn(n, width, dtype=torch.float64) * 0.3
    old = logps + torch.randn(n, width, dtype=torch.float64) * (0.02 if name == "gspo" else 1.0)
    from prefopt.losses._advantages import grpo_advantages

    advantages = grpo_advantages(t(*rewards), torch.tensor(groups))
    beta = 0.04
    if name == "gspo":
        settings = {"beta": beta, "epsilon": 3e-4, "epsilon_high": 4e-4}
        trl = _trl_loss("grpo", "sequence", logps, ref, old, mask, advantages, beta, 3e-4, 4e-4)
    else:
        settings = {"beta": beta, "epsilon_max": 2.0}
        trl = _trl_loss("cispo", "token", logps, ref, old, mask, advantages, beta, 0.2, 2.0)
    trl_loss, trl_grad, fake = trl
    keep = mask.bool()
    flat = logps[keep].clone().requires_grad_(True)
    rows = torch.arange(n)[:, None].expand(n, width)[keep].tolist()
    inputs = rollout_inputs(flat, ref[keep], rows, rewards, groups, old=old[keep])
    ours = get_loss(name)(inputs, **settings)
    ours.loss.backward()
    close(ours.loss, trl_loss, tol=1e-12)
    close(flat.grad, trl_grad[keep], tol=1e-12)
    close(ours.metrics["kl"], fake._metrics["train"]["kl"][0], tol=1e-12)
    if name == "cispo":
        close(ours.metrics["clip_ratio"], fake._metrics["train"]["cispo_clip_ratio"][0], tol=1e-7)
        assert 0 < ours.metrics["clip_ratio"] < 1  # some weights capped, some not
    else:
        assert 0 < ours.metrics["clip_ratio"] < 1  # some completions clipped, some not


def test_rloo_with_a_real_ratio():
    """A reused rollout: pi_old != pi. rows 0 -> tokens 0, 1; 1 -> token 2; 2 -> token 3; rewards
    (1, 0, 0), beta 0: A = (1, -0.5, -0.5). Summed log-ratios (-1.0 + 1.2) + (-0.5 + 0.6) = 0.3,
    -2.0 + 2.3 = 0.3 and 0: rho = (e^0.3, e^0.3, 1). Row 0 (A > 0, rho > 1.2) is clipped: loss -1.2,
    no gradient; row 1 (A < 0) is not: loss 0.5 e^0.3, gradient 0.5 e^0.3; row 2: 0.5, gradient 0.5.
    Mean over the three; clip_ratio 1/3."""
    logps = t(-1.0, -0.5, -2.0, -0.5, grad=True)
    old = t(-1.2, -0.6, -2.3, -0.5)
    inputs = rollout_inputs(logps, t(-1.2, -0.5, -1.0, -1.0), [0, 0, 1, 2], [1.0, 0.0, 0.0], [0, 0, 0], old=old)
    out = get_loss("rloo")(inputs, beta=0.0)
    close(out.loss, (-1.2 + 0.5 * math.exp(0.3) + 0.5) / 3)
    out.loss.backward()
    close(logps.grad, [0.0, 0.0, 0.5 * math.exp(0.3) / 3, 0.5 / 3])
    close(out.metrics["clip_ratio"], 1 / 3)


def test_remax_with_a_real_ratio():
    """Rewards (1, 0), greedy (0.25, 0.5): A = (0.75, -0.5). Log-ratios 0.1 and -0.3: row 0 keeps
    rho = e^0.1 (loss -0.75 e^0.1, gradient -0.75 e^0.1 per token); row 1 (rho = e^-0.3 < 0.8, A < 0)
    is clipped: loss -0.8 * -0.5 = 0.4, no gradient. Mean over the two."""
    logps = t(-1.0, -0.5, -2.0, grad=True)
    inputs = rollout_inputs(
        logps, t(*REF), [0, 0, 1], [1.0, 0.0], [0, 1], old=t(-1.1, -0.5, -1.7), baseline=[0.25, 0.5]
    )
    out = get_loss("remax")(inputs, beta=0.0)
    close(out.loss, (-0.75 * math.exp(0.1) + 0.4) / 2)
    out.loss.backward()
    close(logps.grad, [-0.75 * math.exp(0.1) / 2] * 2 + [0.0])
    close(out.metrics["clip_ratio"], 0.5)


def test_reinforce_pp_with_a_real_ratio():
    """rows [1, 1, 0, 0, 0], scores (1, 0), beta 0: returns (0, 0, 1, 1, 1), mean 0.6, Bessel var 0.3:
    A = (-0.6, -0.6, 0.4, 0.4, 0.4) / sqrt(0.3 + 1e-8). Token log-ratios (-0.3, 0, 0.3, 0, 0): token 0
    (rho = e^-0.3 < 0.8, A < 0) and token 2 (rho = e^0.3 > 1.2, A > 0) are clipped (losses -0.8 A and
    -1.2 A, no gradient); the others lose -A with gradient -A. Token mean (bnpo); clip_ratio 2/5."""
    logps = t(-0.5, -1.0, -1.0, -2.0, -0.5, grad=True)
    old = t(-0.2, -1.0, -1.3, -2.0, -0.5)
    inputs = rollout_inputs(logps, t(-0.7, -1.0, -1.5, -1.5, -0.5), [1, 1, 0, 0, 0], [1.0, 0.0], [0, 1], old=old)
    out = get_loss("reinforce_pp")(inputs, beta=0.0)
    a = [g / math.sqrt(0.3 + 1e-8) for g in (-0.6, -0.6, 0.4, 0.4, 0.4)]
    close(out.loss, (-0.8 * a[0] - a[1] - 1.2 * a[2] - a[3] - a[4]) / 5)
    out.loss.backward()
    close(logps.grad, [0.0, -a[1] / 5, 0.0, -a[3] / 5, -a[4] / 5])
    close(out.metrics["clip_ratio"], 2 / 5)


@pytest.mark.parametrize(
    "loss_type,expected",
    [
        ("bnpo", -A),  # row 0's two tokens, each -A: their mean
        ("grpo", -A),  # row 0's token mean, the only completion kept
        ("dr_grpo", -2 * A / (2 * 4)),  # row 0's sum over completions (2) x max_completion_length (4)
    ],
)
def test_truncation_mask_keeps_the_advantages_and_drops_the_tokens(loss_type, expected):
    """DAPO's masking: row 1 (reward 0, truncated) is masked. The advantages still come from both
    rewards (A = +a for row 0, as unmasked), but only row 0's tokens reach the loss; beta 0, rho 1."""
    inputs = rollout_inputs(t(*LOGPS, grad=True), t(*REF), [0, 0, 1], [1.0, 0.0], [0, 0], max_len=4)
    inputs.completion_mask = t(1.0, 0.0)
    out = get_loss("grpo")(inputs, loss_type=loss_type, beta=0.0)
    close(out.loss, expected)
    out.loss.backward()
    assert inputs.token_logps.grad[2] == 0  # the masked token has no gradient
    for name in ("rloo", "gspo", "cispo"):  # every online loss takes the mask
        masked = rollout_inputs(t(*LOGPS, grad=True), t(*REF), [0, 0, 1], [1.0, 0.0], [0, 0])
        masked.completion_mask = t(1.0, 0.0)
        get_loss(name)(masked).loss.backward()
        assert masked.token_logps.grad[2] == 0 and masked.token_logps.grad[0] != 0, name
    nothing = rollout_inputs(t(*LOGPS, grad=True), t(*REF), [0, 0, 1], [1.0, 0.0], [0, 0])
    nothing.completion_mask = t(0.0, 0.0)
    assert get_loss("grpo")(nothing, beta=0.0).loss.item() == 0.0  # all masked: 0, not NaN
