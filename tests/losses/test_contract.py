"""Identities between losses, validation errors, numerics and gradients for every loss."""

import subprocess
import sys

import pytest
import torch

from prefopt.losses import (
    LossError,
    LossInputs,
    LossOutput,
    available_losses,
    get_loss,
    get_loss_spec,
    register_loss,
    temporary_losses,
    unregister_loss,
)

REQUIRED = ["dpo", "dpop", "tdpo1", "tdpo2", "orpo", "kto"]
# Losses of preference log-probs; the policy-gradient ones (needs_rollouts) take sampled completions
# and have their own contract tests in tests/losses/test_pg_losses.py, and the reward-model ones
# (needs_sequence_scores) take scalar scores: tests/losses/test_bradley_terry.py.
OFFLINE = [
    name
    for name in available_losses()
    if not get_loss_spec(name).needs_rollouts and not get_loss_spec(name).needs_sequence_scores
]


def random_inputs(n=5, dtype=torch.float64, seed=0, scale=10.0) -> LossInputs:
    g = torch.Generator().manual_seed(seed)
    r = lambda: -(torch.rand(n, generator=g, dtype=torch.float64) * scale + 0.1)  # noqa: E731
    lengths = lambda: torch.randint(1, 20, (n,), generator=g).to(torch.float64)  # noqa: E731
    kl = lambda: torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    inputs = LossInputs(
        policy_chosen_logps=r(),
        policy_rejected_logps=r(),
        chosen_lengths=lengths(),
        rejected_lengths=lengths(),
        reference_chosen_logps=r(),
        reference_rejected_logps=r(),
        chosen_kl=kl(),
        rejected_kl=kl(),
        policy_kl_logps=r(),
        reference_kl_logps=r(),
    )
    return LossInputs(**{k: v.to(dtype) for k, v in vars(inputs).items() if v is not None})


def test_required_losses_registered_and_at_least_twelve():
    assert set(REQUIRED) <= set(available_losses())
    assert len(available_losses()) >= 12


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpop_with_zero_lambda_is_dpo(beta):
    inputs = random_inputs()
    dpop = get_loss("dpop")(inputs, beta=beta, dpop_lambda=0.0).loss
    assert torch.allclose(dpop, get_loss("dpo")(inputs, beta=beta).loss, atol=1e-12)


def test_tdpo1_with_zero_kl_is_dpo():
    inputs = random_inputs()
    inputs.chosen_kl = torch.zeros_like(inputs.chosen_kl)
    inputs.rejected_kl = torch.zeros_like(inputs.rejected_kl)
    assert torch.allclose(get_loss("tdpo1")(inputs).loss, get_loss("dpo")(inputs).loss, atol=1e-12)


def test_tdpo2_has_no_gradient_through_chosen_kl_but_tdpo1_does():
    grads = {}
    for name in ("tdpo1", "tdpo2"):
        inputs = random_inputs()
        inputs.chosen_kl.requires_grad_(True)
        inputs.rejected_kl.requires_grad_(True)
        get_loss(name)(inputs).loss.backward()
        grads[name] = (inputs.chosen_kl.grad, inputs.rejected_kl.grad)
    assert grads["tdpo2"][0] is None or torch.all(grads["tdpo2"][0] == 0)
    assert grads["tdpo2"][1].abs().sum() > 0
    assert grads["tdpo1"][0].abs().sum() > 0


def test_dpo_without_smoothing_is_minus_log_sigmoid():
    inputs = random_inputs()
    h = (inputs.policy_chosen_logps - inputs.reference_chosen_logps) - (
        inputs.policy_rejected_logps - inputs.reference_rejected_logps
    )
    expected = -torch.nn.functional.logsigmoid(0.1 * h).mean()
    assert torch.allclose(get_loss("dpo")(inputs, label_smoothing=0.0).loss, expected, atol=1e-12)


@pytest.mark.parametrize("name", OFFLINE)
def test_every_loss_is_finite_on_extreme_inputs(name):
    """logps of -1e4, lengths of 1, mean log-probs at 0 (ORPO's log1mexp edge)."""
    n = 3
    extreme = LossInputs(
        policy_chosen_logps=torch.tensor([-1e4, 0.0, -1e-9]),
        policy_rejected_logps=torch.tensor([0.0, -1e4, -1e4]),
        chosen_lengths=torch.ones(n),
        rejected_lengths=torch.ones(n),
        reference_chosen_logps=torch.tensor([0.0, -1e4, -1e4]),
        reference_rejected_logps=torch.tensor([-1e4, 0.0, -1e-9]),
        chosen_kl=torch.tensor([0.0, 1e4, 5.0]),
        rejected_kl=torch.tensor([1e4, 0.0, 5.0]),
        policy_kl_logps=torch.tensor([-1e4, 0.0, -3.0]),
        reference_kl_logps=torch.tensor([0.0, -1e4, -3.0]),
    )
    for field in ("policy_chosen_logps", "policy_rejected_logps"):
        getattr(extreme, field).requires_grad_(True)
    out = get_loss(name)(extreme)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for field in ("policy_chosen_logps", "policy_rejected_logps"):
        grad = getattr(extreme, field).grad
        assert grad is None or torch.all(torch.isfinite(grad))
    for key, metric in out.metrics.items():
        assert torch.isfinite(torch.as_tensor(metric)), key


@pytest.mark.parametrize("name", OFFLINE)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(name, dtype):
    inputs = random_inputs(dtype=dtype)
    out = get_loss(name)(inputs)
    assert out.loss.dtype == torch.float32
    exact = get_loss(name)(LossInputs(**{k: v.float() for k, v in vars(inputs).items() if v is not None})).loss
    assert torch.allclose(out.loss, exact)


@pytest.mark.parametrize("name", REQUIRED)
def test_gradcheck_float64(name):
    base = random_inputs(n=3, seed=1)
    # Inputs under a stop-gradient by design (TDPO2's chosen KL, KTO's reference point) are held fixed.
    stopped = {"tdpo2": ["chosen_kl"], "kto": ["policy_kl_logps"]}.get(name, [])
    candidates = ["policy_chosen_logps", "policy_rejected_logps", "chosen_kl", "rejected_kl", "policy_kl_logps"]
    differentiable = [k for k in candidates if k not in stopped]
    fn = get_loss(name)

    def f(*tensors):
        return fn(LossInputs(**{**vars(base), **dict(zip(differentiable, tensors, strict=True))})).loss

    tensors = tuple(getattr(base, k).clone().requires_grad_(True) for k in differentiable)
    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("bc,br", [(3, 0), (0, 2)])
def test_kto_handles_an_empty_side(bc, br):
    full = random_inputs(n=3)
    inputs = LossInputs(
        policy_chosen_logps=full.policy_chosen_logps[:bc],
        policy_rejected_logps=full.policy_rejected_logps[:br],
        reference_chosen_logps=full.reference_chosen_logps[:bc],
        reference_rejected_logps=full.reference_rejected_logps[:br],
        policy_kl_logps=full.policy_kl_logps,
        reference_kl_logps=full.reference_kl_logps,
    )
    out = get_loss("kto")(inputs)
    assert torch.isfinite(out.loss)
    assert ("rewards/chosen" in out.metrics) == (bc > 0)
    assert ("rewards/rejected" in out.metrics) == (br > 0)


def test_unknown_loss_lists_available():
    with pytest.raises(LossError, match="unknown loss 'dpoo'; available: .*dpo.*kto"):
        get_loss("dpoo")


def test_unknown_hyperparameter_lists_valid_ones():
    with pytest.raises(LossError, match="no hyperparameter 'gamma'; valid ones: beta, label_smoothing"):
        get_loss("dpo")(random_inputs(), gamma=1.0)


@pytest.mark.parametrize(
    "name,hypers,message",
    [
        ("dpo", {"beta": 0.0}, "beta must be a number > 0"),
        ("dpo", {"beta": -1}, "beta must be a number > 0"),
        ("dpo", {"label_smoothing": 0.5}, r"label_smoothing must be in \[0.0, 0.5\)"),
        ("dpo", {"label_smoothing": -0.1}, r"label_smoothing must be in \[0.0, 0.5\)"),
        ("tdpo2", {"alpha": -0.5}, "alpha must be a number >= 0"),
        ("dpop", {"dpop_lambda": -1.0}, "dpop_lambda must be a number >= 0"),
        ("kto", {"desirable_weight": 0.0}, "desirable_weight must be a number > 0"),
        ("kto", {"undesirable_weight": -2}, "undesirable_weight must be a number > 0"),
        ("orpo", {"beta": "0.1"}, "beta must be a number > 0"),
    ],
)
def test_invalid_values_are_rejected(name, hypers, message):
    with pytest.raises(LossError, match=message):
        get_loss(name)(random_inputs(), **hypers)


def test_paired_losses_reject_unequal_sides():
    inputs = random_inputs(n=4)
    inputs.policy_rejected_logps = inputs.policy_rejected_logps[:3]
    inputs.reference_rejected_logps = inputs.reference_rejected_logps[:3]
    inputs.rejected_lengths = inputs.rejected_lengths[:3]
    inputs.rejected_kl = inputs.rejected_kl[:3]
    with pytest.raises(LossError, match="'dpo' is paired.*4 chosen and 3 rejected"):
        get_loss("dpo")(inputs)
    assert torch.isfinite(get_loss("kto")(inputs).loss)  # unpaired: fine


def test_missing_needed_input_is_named():
    inputs = random_inputs()
    inputs.chosen_kl = None
    with pytest.raises(LossError, match="'tdpo1' needs chosen_kl"):
        get_loss("tdpo1")(inputs)


def test_needs_are_declared():
    assert get_loss_spec("dpo").needs == ["reference"]
    assert get_loss_spec("orpo").needs == ["lengths"] and not get_loss_spec("orpo").needs_reference
    assert get_loss_spec("tdpo2").needs_token_kl
    assert get_loss_spec("kto").needs_kl_pairs and not get_loss_spec("kto").paired
    assert get_loss("tdpo2").spec.hyperparameters == {"beta": 0.1, "alpha": 0.5}


def margin_loss(inputs: LossInputs, *, margin: float = 1.0) -> LossOutput:
    """Hinge on raw log-prob margins."""
    return LossOutput(torch.relu(margin - (inputs.policy_chosen_logps - inputs.policy_rejected_logps)).mean())


def test_user_registered_loss_is_usable_by_name():
    with temporary_losses():
        register_loss("test_margin", needs_reference=False)(margin_loss)
        inputs = LossInputs(torch.tensor([-1.0]), torch.tensor([-1.5]))
        assert get_loss("test_margin")(inputs).loss.item() == pytest.approx(0.5)
        assert get_loss("test_margin")(inputs, margin=2.0).loss.item() == pytest.approx(1.5)
        assert "test_margin" in available_losses()
        with pytest.raises(LossError, match="already registered"):
            register_loss("test_margin")(margin_loss)
    assert "test_margin" not in available_losses()


def test_unregister_and_temporary_losses_restore_the_registry():
    before = available_losses()
    dpo_spec = get_loss_spec("dpo")
    with temporary_losses():
        register_loss("test_margin", needs_reference=False)(margin_loss)
        register_loss("dpo", needs_reference=False, replace=True)(margin_loss)  # shadow a built-in
        assert unregister_loss("ipo").name == "ipo"
        assert "ipo" not in available_losses() and get_loss_spec("dpo").fn is margin_loss
        with pytest.raises(LossError, match="unknown loss 'ipo'"):
            get_loss("ipo")
    assert available_losses() == before and get_loss_spec("dpo") is dpo_spec
    with temporary_losses():
        unregister_loss("ipo")
        with pytest.raises(LossError, match="no loss named 'ipo' is registered"):
            unregister_loss("ipo")
    assert available_losses() == before


def test_cli_lists_losses_with_hyperparameters(tmp_path):
    plugin = tmp_path / "my_losses.py"
    plugin.write_text(
        "import torch\n"
        "from prefopt.losses import LossOutput, register_loss\n"
        "@register_loss('cli_plugin_loss', needs_reference=False)\n"
        "def f(inputs, *, scale: float = 2.0):\n"
        "    '''Plugin loss for the CLI test.'''\n"
        "    return LossOutput(scale * inputs.policy_chosen_logps.mean())\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "prefopt", "losses", "--loss-module", str(plugin)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tdpo2\n" in result.stdout and "hyperparameters: beta=0.1, alpha=0.5" in result.stdout
    assert "needs: reference, token_kl (paired)" in result.stdout
    assert "cli_plugin_loss\n  Plugin loss for the CLI test." in result.stdout
    assert result.stdout.count("hyperparameters:") >= 13
