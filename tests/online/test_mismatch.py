"""The sampler-learner mismatch monitor and truncated importance sampling (prefopt/online/mismatch.py)."""

import math

import torch
from helpers import byte_tokenizer, tiny_llama
from test_pg_losses import LOGPS, A, close, grpo_inputs, rollout_inputs, t
from test_train_online import config, metrics

from prefopt import train
from prefopt.data.collate import shared_prefix_batch
from prefopt.losses import get_loss
from prefopt.models.rollout import SampleSettings, generate_batch, generation_config, left_pad, recording_generation
from prefopt.online.mismatch import in_batch_order, mismatch_metrics
from prefopt.online.step import plain_batch


def test_recording_keeps_the_samples_and_reads_the_untruncated_distribution():
    """With T = 0.7 and top-p 0.9 the recorder sees the same draws as plain sampling, and reads each
    sampled token's log softmax(logits / T) over the whole vocabulary (not the renormalised top-p
    set): recomputed with a plain forward over [prompt; completion], to fp32 rounding."""
    model, tok = tiny_llama(), byte_tokenizer()
    model.eval()
    settings = SampleSettings(num_samples=3, max_new_tokens=6, temperature=0.7, top_p=0.9)
    ids, mask = left_pad([tok("Hello")["input_ids"], tok("Hi there")["input_ids"]], tok.pad_token_id, "cpu")
    config = generation_config(model, tok, settings)
    torch.manual_seed(3)
    plain = generate_batch(model, ids, mask, 3, config)
    recording, processors, recorder = recording_generation(config)
    torch.manual_seed(3)
    recorded = generate_batch(model, ids, mask, 3, recording, True, processors)
    assert torch.equal(plain, recorded)
    logps = recorder.finish(recorded)
    assert logps.shape == recorded.shape
    full = torch.cat([ids.repeat_interleave(3, 0), recorded], dim=1)
    attention = torch.cat([mask.repeat_interleave(3, 0), torch.ones_like(recorded)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=attention).logits[:, ids.shape[1] - 1 : -1] / 0.7
    expected = torch.log_softmax(logits.float(), -1).gather(2, recorded[..., None]).squeeze(-1)
    assert torch.allclose(logps, expected, atol=2e-5), (logps - expected).abs().max()
    truncated = expected.exp() < 0.9  # somewhere top-p renormalisation would have raised the probability
    assert truncated.any()


def test_in_batch_order_follows_the_packed_layout():
    """Per-completion values land where the shared-prefix layout (packed or not) puts each row's
    tokens: equal to the plain layout's order, where rows follow each other."""
    tok = byte_tokenizer()
    groups = [(tok("ab")["input_ids"], [[5, 6, 7], [8]]), (tok("c")["input_ids"], [[9, 10]])]
    rows = [[0, 1], [2]]
    per_row = [t(-1.0, -2.0, -3.0), t(-4.0), t(-5.0, -6.0)]
    plain = in_batch_order(plain_batch(groups, rows, tok.pad_token_id), per_row)
    assert plain.tolist() == [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]
    for pack in (True, False):
        batch = shared_prefix_batch(groups, rows, tok.pad_token_id, pack)
        placed = in_batch_order(batch, per_row)
        for row, values in enumerate(per_row):
            assert placed[batch.predict_row == row].tolist() == values.tolist()
        pairs = zip(batch.predict_row.tolist(), placed.tolist(), strict=True)
        token_of = dict(zip(pairs, batch.predict_token.tolist(), strict=True))
        assert token_of[(0, -1.0)] == 5 and token_of[(2, -6.0)] == 10  # each value sits on its own token


def test_mismatch_metrics_by_hand():
    """learner (-1, -2, -0.5), sampler (-1.1, -2, -0.3): delta (0.1, 0, -0.2); mean |delta| 0.1;
    ratios (e^0.1, 1, e^-0.2); k3 = mean(e^d - 1 - d) = (e^0.1 - 1.1 + 0 + e^-0.2 - 0.8) / 3."""
    values = mismatch_metrics(t(-1.0, -2.0, -0.5), t(-1.1, -2.0, -0.3))
    close(values["mismatch/mean_abs_logp_diff"], 0.1)
    close(values["mismatch/max_ratio"], math.exp(0.1))
    close(values["mismatch/min_ratio"], math.exp(-0.2))
    close(values["mismatch/token_kl"], (math.exp(0.1) - 1.1 + math.exp(-0.2) - 0.8) / 3)


def test_tis_weights_grpo_tokens_by_the_capped_ratio():
    """GRPO, bnpo, beta 0, one update (old == sg(logp)): the surrogate of token k is -A_k, times
    w_k = min(e^(logp_k - sampler_k), cap). Sampler below the learner by (1.0, 0, -0.5) with cap 2:
    w = (min(e, 2), 1, e^-0.5) = (2, 1, 0.606531); A = (a, a, -a): loss = (-2a - a + 0.606531 a) / 3."""
    inputs = grpo_inputs()
    inputs.sampler_token_logps = t(LOGPS[0] - 1.0, LOGPS[1], LOGPS[2] + 0.5)
    inputs.importance_cap = 2.0
    out = get_loss("grpo")(inputs, loss_type="bnpo", beta=0.0)
    close(out.loss, (-2 * A - A + math.exp(-0.5) * A) / 3)
    out.loss.backward()
    close(inputs.token_logps.grad, [-2 * A / 3, -A / 3, math.exp(-0.5) * A / 3])
    inputs.importance_cap = None  # off: the plain surrogate
    close(get_loss("grpo")(inputs, loss_type="bnpo", beta=0.0).loss, (-A - A + A) / 3)


def test_tis_for_one_ratio_per_completion():
    """RLOO: one weight per completion, min(e^(sum_t logp - sampler), cap): row 0's tokens are 0.2
    and 0.1 above the sampler (w0 = e^0.3), row 1 equal (w1 = 1), row 2 1.0 above (w2 = min(e, 1.5)).
    R = (1, 0, 0), beta 0: A = (1, -0.5, -0.5); loss = (-w0 + 0.5 w1 + 0.5 w2) / 3."""
    logps = t(-1.0, -0.5, -2.0, -0.5)
    inputs = rollout_inputs(logps, t(-1.2, -0.5, -1.0, -1.0), [0, 0, 1, 2], [1.0, 0.0, 0.0], [0, 0, 0])
    inputs.sampler_token_logps, inputs.importance_cap = t(-1.2, -0.6, -2.0, -1.5), 1.5
    out = get_loss("rloo")(inputs, beta=0.0)
    close(out.loss, (-math.exp(0.3) + 0.5 + 0.5 * 1.5) / 3)


def test_online_training_logs_the_mismatch(setup, tmp_path, capsys):
    """In fp32 the sampler (KV cache, eval mode) and the learner agree to rounding; every step logs
    the four figures. A threshold below that rounding warns, once."""
    result = train(config(setup, tmp_path, max_steps=2, mismatch_threshold=1e-12))
    rows = metrics(result.output_dir)
    for row in rows:
        assert 0 <= row["mismatch/mean_abs_logp_diff"] < 1e-4
        assert row["mismatch/min_ratio"] <= 1 <= row["mismatch/max_ratio"] < 1.001
        assert 0 <= row["mismatch/token_kl"] < 1e-8
    assert capsys.readouterr().out.count("the run is partly off-policy") == 1
    capped = train(config(setup, tmp_path, max_steps=2, importance_sampling_cap=2.0, output_dir=str(tmp_path / "c")))
    assert len(metrics(capped.output_dir)) == 2
