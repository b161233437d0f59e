"""PPO with a critic: hand-computed float64 values of the loss, then the trainer serving its value head."""

import json

import pytest
import torch
from test_pg_losses import close, rollout_inputs, t
from test_train_online import config

from prefopt import TrainConfig, train
from prefopt.losses import LossError, get_loss, get_loss_spec
from prefopt.online.critic import VALUE_HEAD_FILE


def ppo_inputs(logps, ref, rows, rewards, values, old_values=None):
    inputs = rollout_inputs(logps, ref, rows, rewards, [0] * len(rewards))
    inputs.token_values = values
    inputs.old_token_values = old_values
    return inputs


def test_ppo_gae_values_and_gradients():
    """The docstring's example. One completion of two tokens, score 1, logp = ref (no KL),
    V = V_old = (0.5, 0.25), gamma 1, lam 0.5, no whitening:
    r = (0, 1); delta = (0 + 0.25 - 0.5, 1 + 0 - 0.25) = (-0.25, 0.75);
    A = (-0.25 + 0.5 * 0.75, 0.75) = (0.125, 0.75); R = A + V = (0.625, 1.0).
    policy loss = mean(-A) = -0.4375; value loss = 0.5 * mean((V - R)^2) = 0.5 * (0.015625 + 0.5625) / 2
    = 0.14453125; loss = -0.4375 + 0.1 * 0.14453125 = -0.423046875.
    d loss / d logp_t = -A_t / 2 = (-0.0625, -0.375); d loss / d V_t = 0.1 * (V_t - R_t) / 2 = (-0.00625, -0.0375).
    explained variance = 1 - Var(R - V) / Var(R) = 1 - Var(0.125, 0.75) / Var(0.625, 1.0)
    = 1 - 0.1953125 / 0.0703125 = -1.7777...
    """
    logps, values = t(-1.0, -1.0, grad=True), t(0.5, 0.25, grad=True)
    inputs = ppo_inputs(logps, t(-1.0, -1.0), [0, 0], [1.0], values)
    out = get_loss("ppo")(inputs, lam=0.5, whiten_advantages=False)
    close(out.loss, -0.423046875)
    close(out.metrics["policy_loss"], -0.4375)
    close(out.metrics["value_loss"], 0.14453125)
    close(out.metrics["explained_variance"], 1 - 0.1953125 / 0.0703125)
    close(out.metrics["kl"], 0.0)
    out.loss.backward()
    close(logps.grad, [-0.0625, -0.375])
    close(values.grad, [-0.00625, -0.0375])


def test_ppo_kl_is_a_step_reward_and_advantages_are_whitened():
    """logp = (-1, -1), ref = (-1.5, -1): k1 = (0.5, 0); beta 0.1 -> r = (-0.05, 0 + score 1) = (-0.05, 1).
    V_old = 0, gamma = lam = 1: A = R = (0.95, 1.0). Whitened: mean 0.975, Bessel var 2 * 0.025^2 = 0.00125,
    A_w = (-0.025, 0.025) / sqrt(0.00125 + 1e-8): policy loss mean(-A_w) = 0, its gradient -A_w / 2.
    value loss 0.5 * (0.95^2 + 1^2) / 2 = 0.475625; loss = 0 + 0.1 * 0.475625 = 0.0475625; kl = mean(k1) = 0.25.
    """
    logps = t(-1.0, -1.0, grad=True)
    inputs = ppo_inputs(logps, t(-1.5, -1.0), [0, 0], [1.0], t(0.0, 0.0, grad=True))
    out = get_loss("ppo")(inputs, beta=0.1, gamma=1.0, lam=1.0)
    close(out.loss, 0.0475625)
    close(out.metrics["kl"], 0.25)
    close(out.metrics["explained_variance"], 0.0)
    out.loss.backward()
    a = 0.025 / (0.00125 + 1e-8) ** 0.5
    close(logps.grad, [a / 2, -a / 2])


def test_ppo_gamma_discounts_the_score():
    """gamma 0.5, lam 1, V = 0, no KL, score 1 on a 3-token completion: A = R = (0.25, 0.5, 1);
    value loss 0.5 * (0.0625 + 0.25 + 1) / 3 = 0.21875; policy loss -(1.75) / 3."""
    inputs = ppo_inputs(t(-1.0, -1.0, -1.0), t(-1.0, -1.0, -1.0), [0, 0, 0], [1.0], t(0.0, 0.0, 0.0))
    out = get_loss("ppo")(inputs, gamma=0.5, lam=1.0, whiten_advantages=False)
    close(out.metrics["value_loss"], 0.21875)
    close(out.metrics["policy_loss"], -1.75 / 3)


@pytest.mark.parametrize(
    "value,expected_loss,expected_grad,clipped",
    [
        # V = 1.0 moved 0.5 from V_old = 0.5, beyond cliprange 0.2: clipped V = 0.7;
        # R = 2 (score 2, V_old 0.5: delta 1.5, R = 1.5 + 0.5); max((1 - 2)^2, (0.7 - 2)^2) = 1.69 -> 0.845,
        # and the clipped branch has no gradient in V.
        (1.0, 0.845, 0.0, 1.0),
        # V = 0.6 within the clip: both branches (0.6 - 2)^2 = 1.96 -> 0.98, gradient 0.1 * (0.6 - 2) = -0.14.
        (0.6, 0.98, -0.14, 0.0),
    ],
)
def test_ppo_clipped_value_loss(value, expected_loss, expected_grad, clipped):
    values = t(value, grad=True)
    inputs = ppo_inputs(t(-1.0), t(-1.0), [0], [2.0], values, old_values=t(0.5))
    out = get_loss("ppo")(inputs, cliprange_value=0.2, whiten_advantages=False)
    close(out.metrics["value_loss"], expected_loss)
    close(out.metrics["policy_loss"], -1.5)  # A = 1.5, rho = 1
    close(out.metrics["value_clip_ratio"], clipped)
    out.loss.backward()
    close(values.grad, [expected_grad])


def test_ppo_declares_a_value_model_and_needs_values():
    assert get_loss_spec("ppo").needs == ["reference", "rollouts", "value_model"]
    inputs = rollout_inputs(t(-1.0), t(-1.0), [0], [1.0], [0])
    with pytest.raises(LossError, match="needs token_values"):
        get_loss("ppo")(inputs)
    with pytest.raises(LossError, match="lam"):
        get_loss("ppo")(ppo_inputs(t(-1.0), t(-1.0), [0], [1.0], t(0.0)), lam=1.5)


def test_value_head_starts_at_zero_and_stays_float32_under_autocast():
    from prefopt.online.critic import ValueHead

    head = ValueHead(8)
    hidden = torch.randn(3, 8, dtype=torch.bfloat16)
    assert torch.equal(head(hidden), torch.zeros(3))
    torch.nn.init.normal_(head.summary.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = head(hidden)
    assert values.dtype == torch.float32
    assert torch.allclose(values, hidden.float() @ head.summary.weight[0] + head.summary.bias, atol=1e-6)


# -- the trainer serves the critic --------------------------------------------------------------


def ppo_config(setup, output_dir, **overrides) -> TrainConfig:
    """The GRPO tests' tiny setup (digit-share reward), as PPO: G 2, 6 new tokens, 4 steps, checkpoints at 2."""
    settings = dict(loss="ppo", num_generations=2, max_new_tokens=6, batch_size=2, max_steps=4, save_steps=2)
    return config(setup, output_dir, **{**settings, "output_dir": str(output_dir), **overrides})


def logged(output_dir) -> dict[int, dict]:
    rows = map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: row for row in rows if "value_loss" in row}


def test_ppo_trains_actor_and_critic_and_resumes_exactly(setup, tmp_path):
    """4 steps of PPO on the tiny model: the value head moves from 0, value_loss and explained_variance are
    logged, final/ holds the head; a run stopped after checkpoint-2 and resumed logs the same values and
    ends with the same policy and value head as the run that never stopped."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    straight = train(ppo_config(setup, tmp_path / "straight"))
    rows = logged(straight.output_dir)
    assert sorted(rows) == [1, 2, 3, 4]
    for key in ("reward", "kl", "completion_length", "clip_ratio", "value_loss", "explained_variance", "value"):
        assert all(key in row for row in rows.values()), key
    assert rows[1]["value"] == 0.0 and rows[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # fresh head; policy == ref
    head = load_file(straight.final_dir / VALUE_HEAD_FILE)
    assert head["summary.weight"].abs().sum() > 0, "the value head never trained"
    assert (straight.output_dir / "checkpoint-2" / VALUE_HEAD_FILE).is_file()

    train(ppo_config(setup, tmp_path / "stopped"), callbacks=[StopAfter()], save_final=False)
    resumed = train(ppo_config(setup, tmp_path / "stopped", resume=True))
    assert resumed.steps == 4

    def values(rows):
        return {s: (r["reward"], r["loss"], r["value_loss"]) for s, r in rows.items()}

    assert values(logged(resumed.output_dir)) == values(rows)  # bit-identical on the CPU
    for name in ("model.safetensors", VALUE_HEAD_FILE):
        a, b = load_file(straight.final_dir / name), load_file(resumed.final_dir / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_ppo_with_lora_uses_the_adapter_off_reference(setup, tmp_path):
    """With LoRA the reference is the policy with its adapter off (no copy); the critic's head trains
    beside the adapter, at value_learning_rate when one is given."""
    result = train(
        ppo_config(setup, tmp_path / "lora", lora=True, max_steps=2, save_steps=1000, value_learning_rate=0.5)
    )
    assert result.reference == "adapter"
    groups = result.trainer.optimizer.param_groups  # the head is the last group, at its own peak lr
    assert groups[-1]["initial_lr"] == 0.5 and groups[0]["initial_lr"] == 1e-2
    assert {id(p) for p in groups[-1]["params"]} == {id(p) for p in result.trainer.critic.parameters()}
    assert (result.final_dir / VALUE_HEAD_FILE).is_file()
    assert len(logged(result.output_dir)) == 2
