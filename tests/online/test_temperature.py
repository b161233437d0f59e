"""Completions sampled at temperature T are scored under softmax(logits / T), the distribution they
came from (TRL's GRPOTrainer does the same), for the policy and the reference, on every head path."""

import torch
import torch.nn.functional as F
from helpers import assert_f32_close, byte_tokenizer, tiny_llama

from prefopt.data.formats import PromptExample
from prefopt.losses import LossOutput
from prefopt.models.logps import completion_states, completion_token_logps, output_head
from prefopt.models.rollout import SampleSettings
from prefopt.online.step import PromptItem, Rollouts, plain_batch
from prefopt.training.reference import ModelReference


def _expected(model, batch, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at each completion token, from one plain forward."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    picked = logits.reshape(-1, logits.shape[-1])[batch.predict_from] / temperature
    return F.log_softmax(picked.double(), dim=-1).gather(-1, batch.predict_token[:, None]).squeeze(-1)


def _batch(tok):
    groups = [(tok("Hello there")["input_ids"], [tok(" ab")["input_ids"], tok(" xyz!")["input_ids"]])]
    return plain_batch(groups, [[0, 1]], tok.pad_token_id)


def test_token_logps_divide_the_logits_by_the_temperature_on_every_head_path():
    model, tok = tiny_llama(), byte_tokenizer()
    batch = _batch(tok)
    with torch.no_grad():
        states = completion_states(model, batch)
        logit_states = completion_states(model, batch, use_logits=True)
        biased = torch.nn.Linear(64, 259, bias=True)
        biased.weight.copy_(output_head(model).weight)
        biased.bias.zero_()
        for temperature in (0.5, 1.0, 1.7):
            expected = _expected(model, batch, temperature)
            fused = completion_token_logps(output_head(model), states, temperature=temperature)
            logits = completion_token_logps(torch.nn.Identity(), logit_states, temperature=temperature)
            module = completion_token_logps(biased, states, temperature=temperature)
            for got, what in ((fused, "fused"), (logits, "logits"), (module, "biased head")):
                assert_f32_close(got, expected, what=f"{what} at T={temperature}")
        # and they differ: T = 0.5 sharpens the distribution, so the scores are not T = 1's
        assert (
            completion_token_logps(output_head(model), states, temperature=0.5) - _expected(model, batch, 1.0)
        ).abs().max() > 0.01


def test_rollouts_hand_the_loss_log_probs_at_the_sampling_temperature():
    torch.manual_seed(0)
    model, tok = tiny_llama(), byte_tokenizer()
    captured = []

    def loss_fn(inputs, **_):
        captured.append(inputs)
        return LossOutput(loss=inputs.token_logps.sum())

    def reward(prompts, completions, **_):
        return [float(len(c)) for c in completions]

    settings = SampleSettings(num_samples=3, max_new_tokens=6, temperature=0.5)
    rollouts = Rollouts(tok, reward, settings, share_prefix=False)
    item = PromptItem(tok("Count: ")["input_ids"], PromptExample("Count: ", {}, "p:1"), 0)
    reference = tiny_llama(seed=1)
    _, _, batch = rollouts(model, [item], loss_fn, {}, reference=ModelReference(reference))
    assert_f32_close(captured[0].token_logps.detach(), _expected(model, batch, 0.5), what="policy token log-probs")
    assert_f32_close(captured[0].reference_token_logps, _expected(reference, batch, 0.5), what="reference's")
