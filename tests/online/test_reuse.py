"""Rollout reuse (`num_iterations` mu, `steps_per_generation` S): prefopt/online/reuse.py."""

import pytest
import torch
from test_train_online import config, metrics

from prefopt import TrainConfig, train
from prefopt.config import ConfigError
from prefopt.errors import PrefoptError
from prefopt.losses import get_loss
from prefopt.losses.registry import register_loss
from prefopt.online.reuse import ReusePlan, RolloutSampler, reuse_plan
from prefopt.rewards import register_reward

CALLS: list[dict] = []  # what the recording losses saw, call by call


def _record(inputs, name: str, **kwargs):
    CALLS.append(
        {
            "token_logps": inputs.token_logps.detach().clone(),
            "old": None if inputs.old_token_logps is None else inputs.old_token_logps.clone(),
            "reference": inputs.reference_token_logps.clone(),
            "rewards": inputs.rewards.tolist(),
            "values": None if inputs.token_values is None else inputs.token_values.detach().clone(),
            "old_values": None if inputs.old_token_values is None else inputs.old_token_values.clone(),
        }
    )
    return get_loss(name)(inputs, **kwargs)


@register_reward("test_reuse_length", replace=True)
def length_reward(prompts, completions, **columns):
    """Almost never equal within a group, so every step has a gradient and moves the policy."""
    return [len(text) / 10 for text in completions]


def reuse_config(setup, tmp_path, **overrides):
    return config(setup, tmp_path, reward="test_reuse_length", reward_module=[], batch_size=2, **overrides)


@register_loss("test_recording_grpo", needs_rollouts=True, paired=False, replace=True)
def recording_grpo(inputs, *, beta: float = 0.04, epsilon: float = 0.2):
    return _record(inputs, "grpo", beta=beta, epsilon=epsilon)


@register_loss("test_recording_ppo", needs_rollouts=True, paired=False, needs_value_model=True, replace=True)
def recording_ppo(inputs, *, vf_coef: float = 0.1):
    return _record(inputs, "ppo", vf_coef=vf_coef)


def test_sampler_repeats_each_generation_batch_and_drops_an_incomplete_one():
    """10 prompts, 2 per process x 2 processes = chunks of 4: two chunks (8 prompts; 2 left out), each
    3 times in a row, the same permutation for the same seed and epoch, another for the next epoch."""
    sampler = RolloutSampler(10, prompts_per_process=2, processes=2, repeats=3, seed=7)
    order = list(sampler)
    assert len(order) == len(sampler) == 2 * 4 * 3
    first, second = order[:4], order[12:16]
    assert order[:12] == first * 3 and order[12:] == second * 3
    assert len(set(first + second)) == 8
    assert list(RolloutSampler(10, 2, 2, 3, seed=7)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    with pytest.raises(PrefoptError, match="samples 8 prompts at a time .* the data has 5"):
        RolloutSampler(5, 4, 2, 2, seed=0)


def test_too_few_prompts_for_one_generation_batch_is_refused_before_the_model_loads(setup, tmp_path):
    """batch_size 4 x S 2 = 8 prompts per generation batch, but the file has fewer: the error comes
    while the prompts are read, so the model (here a path that does not exist) is never loaded and
    the output folder is never made."""
    root, _ = setup
    prompts = (root / "prompts.jsonl").read_text().splitlines()
    few = tmp_path / "few.jsonl"
    few.write_text("\n".join(prompts[:3]) + "\n")
    cfg = config(
        setup, tmp_path, data=[str(few)], model=str(tmp_path / "no-model"), num_iterations=2, steps_per_generation=2
    )
    with pytest.raises(PrefoptError, match="samples 8 prompts at a time .* the data has 3"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_plan_defaults_follow_trl_and_config_checks_the_split():
    assert reuse_plan(1, None, grad_accum=4) == ReusePlan(1, 1)  # today's stream, draw for draw
    assert reuse_plan(2, None, grad_accum=4) == ReusePlan(2, 4)  # TRL: S = grad_accum
    assert reuse_plan(2, 8, grad_accum=4).window == 16
    assert not ReusePlan(1, 1).active
    with pytest.raises(ConfigError, match=r"steps_per_generation \(3\) must be a multiple of grad_accum \(2\)"):
        TrainConfig(loss="grpo", steps_per_generation=3, grad_accum=2)


def test_mu_2_reuses_each_rollout_and_its_ratio_is_real(setup, tmp_path):
    """mu = 2, one micro-batch per step: steps 1-2 train on one sampled batch, steps 3-4 on the next.
    Pass 2 sees the completions, rewards and reference log-probs of pass 1, with pass 1's log-probs
    as pi_old; the update between them moved the policy, so rho = e^(logp - old) != 1."""
    CALLS.clear()
    result = train(reuse_config(setup, tmp_path, loss="test_recording_grpo", num_iterations=2, max_steps=4))
    assert len(CALLS) == 4
    first, second, third, _ = CALLS
    assert first["old"] is None  # the pass before any update: pi_old == sg(pi)
    assert torch.equal(second["old"], first["token_logps"])
    assert torch.equal(second["reference"], first["reference"]) and second["rewards"] == first["rewards"]
    ratio = (second["token_logps"] - second["old"]).exp()
    assert (ratio - 1).abs().max() > 1e-3, "the policy did not move between the passes"
    assert third["old"] is None  # step 3 samples anew
    fresh = third["token_logps"].shape != first["token_logps"].shape
    assert fresh or not torch.equal(third["token_logps"], first["token_logps"])
    rows = metrics(result.output_dir)
    assert [r["reward"] for r in rows][0] == rows[1]["reward"]  # one sampled batch, two steps
    assert rows[0]["generation_s"] > 0 and rows[1]["generation_s"] == 0.0


def test_mini_batches_after_an_update_get_pi_old_from_the_sampler(setup, tmp_path):
    """S = 2 slices of one sampled batch, one optimizer step each (mu = 1): the first slice is trained
    before any update (pi_old == sg(pi), none stored), the second after one, so its pi_old is the
    sampler's log-prob, computed when it was sampled: equal to what the untrained model gives."""
    CALLS.clear()
    train(reuse_config(setup, tmp_path, loss="test_recording_grpo", steps_per_generation=2, max_steps=2))
    first, second = CALLS
    assert first["old"] is None and second["old"] is not None
    assert (second["token_logps"] - second["old"]).abs().max() > 1e-3


def test_mini_batches_within_one_step_are_all_on_policy(setup, tmp_path):
    """S = grad_accum = 2: both slices are trained in the step that sampled them, so neither needs pi_old."""
    CALLS.clear()
    train(reuse_config(setup, tmp_path, loss="test_recording_grpo", steps_per_generation=2, grad_accum=2, max_steps=1))
    assert [c["old"] for c in CALLS] == [None, None]


def test_ppo_reuses_the_values_at_sampling(setup, tmp_path):
    """PPO with mu = 2: pass 2's value clip is around the critic's values of pass 1 (V_old)."""
    CALLS.clear()
    train(reuse_config(setup, tmp_path, loss="test_recording_ppo", num_iterations=2, max_steps=2))
    first, second = CALLS
    assert first["old_values"] is None and torch.equal(second["old_values"], first["values"])
    assert not torch.equal(second["values"], first["values"]), "the value head did not move"


@pytest.mark.parametrize("stop_at", [1, 2])
def test_resume_inside_a_window_is_exact(setup, tmp_path, stop_at):
    """mu = 2, stopped after step 1 (inside a window: the checkpoint keeps it) or step 2 (at its end),
    then resumed: the same rewards, losses and final weights as the run that never stopped."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                control.should_training_stop = True

    settings = dict(max_steps=4, save_steps=1, num_iterations=2)
    straight = train(reuse_config(setup, tmp_path, output_dir=str(tmp_path / "straight"), **settings))
    train(reuse_config(setup, tmp_path, output_dir=str(tmp_path / "stopped"), **settings), callbacks=[StopAfter()])
    window = tmp_path / "stopped" / f"checkpoint-{stop_at}" / "rollout_window_rank0.pt"
    assert window.exists() == (stop_at == 1)
    resumed = train(reuse_config(setup, tmp_path, output_dir=str(tmp_path / "stopped"), resume=True, **settings))

    def by_step(output_dir):
        return {r["step"]: (r["reward"], r["loss"], r["kl"]) for r in metrics(output_dir)}

    assert by_step(resumed.output_dir) == by_step(straight.output_dir)  # bit-identical on the CPU
    a, b = load_file(straight.final_dir / "model.safetensors"), load_file(resumed.final_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
