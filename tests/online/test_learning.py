"""Every policy-gradient loss learns: a one-token target's probability rises within a few steps.

The task: answer each prompt with one token; the reward is 1 for a digit, 0 otherwise. The tiny
random byte-level model gives the digits P = 0.038 on average over the prompts. After 12 steps of
each loss (G = 8 one-token completions per prompt, full weights) that probability, read from the
model itself, must have risen by half. Measured here: grpo 0.072, rloo 0.101, remax 0.066,
reinforce_pp 0.180, ppo 0.074.
"""

import pytest
import torch
from helpers import byte_tokenizer
from test_train_online import config

from prefopt import train
from prefopt.online.step import tokenize_prompts

REWARD = """
from prefopt.rewards import register_reward


@register_reward("test_one_digit", replace=True)
def one_digit(prompts, completions, **columns):
    return [float(len(text) == 1 and text.isdigit()) for text in completions]
"""


def digit_probability(model, setup) -> float:
    """Mean over the prompts of P(first completion token is a digit) under `model`."""
    from prefopt.data.formats import load_prompts

    root, _ = setup
    tok = byte_tokenizer()
    prompts, _ = load_prompts([str(root / "prompts.jsonl")])
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    total = 0.0
    with torch.no_grad():
        for item in tokenize_prompts(prompts, tok, None):
            logits = model(torch.tensor([item.prompt_ids])).logits[0, -1]
            total += float(logits.softmax(-1)[digits].sum())
    return total / len(prompts)


@pytest.mark.parametrize(
    "loss,learning_rate",
    # ReMax's greedy baseline here is a non-digit (reward 0), so only the rare digit samples carry a
    # signal (RLOO's and GRPO's non-digits get negative advantages too): it gets twice the step size.
    [
        ("grpo", 1e-2),
        ("gspo", 1e-2),
        ("cispo", 1e-2),
        ("rloo", 1e-2),
        ("remax", 2e-2),
        ("reinforce_pp", 1e-2),
        ("ppo", 1e-2),
    ],
)
def test_each_online_loss_raises_a_one_token_targets_probability(setup, tmp_path, loss, learning_rate):
    from transformers import AutoModelForCausalLM

    root, model_dir = setup
    (tmp_path / "one_digit.py").write_text(REWARD)
    before = digit_probability(AutoModelForCausalLM.from_pretrained(model_dir), setup)
    result = train(
        config(
            setup,
            tmp_path,
            loss=loss,
            reward="test_one_digit",
            reward_module=[str(tmp_path / "one_digit.py")],
            num_generations=8,
            max_new_tokens=1,
            max_steps=12,
            learning_rate=learning_rate,
        )
    )
    after = digit_probability(result.trainer.model.eval(), setup)
    assert after > 1.5 * before, (loss, before, after)
