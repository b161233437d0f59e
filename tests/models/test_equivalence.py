"""Each optimisation equals the plain path (to float32 rounding), on a tiny model, for every required loss:
chunked vs unchunked log-probs and KL (fused linear-head path and checkpointed path), lean RMSNorm/SwiGLU
vs stock modules, prefix-shared vs two sequences, per-example values independent of padding
(grouped vs plain batches), cached vs online reference."""

import pytest
import torch
from helpers import assert_f32_grad_close, byte_tokenizer, f32_error, tiny_llama

from prefopt.data import (
    PairExample,
    PreferenceCollator,
    PreferenceTokenizer,
    attach_mismatched_completions,
    pairs_to_singles,
)
from prefopt.losses import LossInputs, get_loss, get_loss_spec
from prefopt.models.lean import make_lean
from prefopt.models.logps import completion_states, full_logits_scores, output_head, score_completions
from prefopt.training.reference import ModelReference

PAIRS = [
    PairExample("Q: what is 2+2?", " It is 4.", " five", "a"),
    PairExample("Say hi.", " Hello there, friend!", " no", "b"),
    PairExample("Capital of France?", " Paris.", " Berlin, I think, or maybe Rome", "c"),
]
# One long pair: in the shared-prefix layout the three short pairs above are packed into one sequence beside it.
LONG_PAIR = PairExample("Tell me a long story about a cat. " * 3, " Once upon a time, a cat." * 3, " No.", "d")
REQUIRED = ["dpo", "dpop", "tdpo1", "tdpo2", "orpo", "kto"]


def close(a, b, scale=None):
    """Equal up to float32 rounding relative to the tensor's largest entry (see helpers.f32_error):
    chunking, prefix sharing and lean modules change only the order of summation."""
    return f32_error(a, b, scale) <= 1.0


def tokenized(name, pairs=PAIRS):
    tok = byte_tokenizer()
    examples = pairs if get_loss_spec(name).paired else pairs_to_singles(pairs)
    items = PreferenceTokenizer(tok, 128).all(examples)
    if get_loss_spec(name).needs_kl_pairs:
        attach_mismatched_completions(items, 128)
    return tok, items


def plain_reference_scores(model, ref, tok, items, with_kl):
    """The oracle: full logits for every row, no chunking, no sharing."""
    batch = PreferenceCollator(tok.pad_token_id, with_kl_pairs=with_kl)(items)
    completion = torch.zeros_like(batch.input_ids).view(-1)
    completion[batch.predict_from + 1] = 1  # the token after each predicting position is a completion token
    completion = completion.view(batch.input_ids.shape)
    with torch.no_grad():
        ref_logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    logps, lengths, kl, _ = full_logits_scores(model, batch.input_ids, batch.attention_mask, completion, ref_logits)
    ref_logps, _, _, _ = full_logits_scores(ref, batch.input_ids, batch.attention_mask, completion)
    return batch, logps, lengths, kl, ref_logps.detach()


def loss_from(name, batch, logps, lengths, kl, ref_logps):
    c, r, k = batch.chosen_rows, batch.rejected_rows, batch.kl_rows
    inputs = LossInputs(
        logps[c],
        logps[r],
        lengths[c],
        lengths[r],
        ref_logps[c],
        ref_logps[r],
        kl[c],
        kl[r],
        logps[k] if len(k) else None,
        ref_logps[k] if len(k) else None,
    )
    return get_loss(name)(inputs).loss


def loss_size(name, batch, logps, lengths, kl, ref_logps) -> float:
    """|loss| plus how far rounding relative to its inputs' sizes can move it, to first order:
    sum |d loss / d input| * |input| (DPOP's lambda = 50 makes the loss 50x more sensitive than DPO's)."""
    inputs = [t.detach().clone().requires_grad_() for t in (logps, kl, ref_logps)]
    loss = loss_from(name, batch, inputs[0], lengths, inputs[1], inputs[2])
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return abs(loss.item()) + sum(
        (g * t).abs().sum().item() for g, t in zip(grads, inputs, strict=True) if g is not None
    )


def optimised_scores(model, ref, tok, items, with_kl, share_prefix, chunk_size, token_kl):
    """As the trainer scores: token-level KL only for losses that declare it (TDPO's chunked KL path);
    the others take the fused linear-head path."""
    batch = PreferenceCollator(tok.pad_token_id, with_kl_pairs=with_kl, share_prefix=share_prefix)(items)
    ref_logps, ref_states, ref_head = ModelReference(ref, chunk_size=chunk_size)(model, batch, keep_states=token_kl)
    states = completion_states(model, batch)
    logps, lengths, kl = score_completions(output_head(model), states, chunk_size, ref_head, ref_states)
    return batch, logps, lengths, kl, ref_logps


@pytest.mark.parametrize("name", REQUIRED)
@pytest.mark.parametrize(
    "share_prefix,chunk_size,lean,packable",
    [
        (False, 1, False, False),
        (False, 5, True, False),
        (True, 3, True, False),
        (True, 1024, False, False),
        (True, 7, True, True),
        (False, 1024, False, True),
    ],
)
def test_optimised_path_equals_plain_path(name, share_prefix, chunk_size, lean, packable):
    tok, items = tokenized(name, PAIRS + [LONG_PAIR] if packable else PAIRS)
    spec = get_loss_spec(name)
    with_kl = spec.needs_kl_pairs
    results = {}
    for label in ("plain", "optimised"):
        model, ref = tiny_llama(0).train(), tiny_llama(1)
        if label == "plain":
            batch, logps, lengths, kl, ref_logps = plain_reference_scores(model, ref, tok, items, with_kl)
        else:
            if lean:
                assert make_lean(model) == {"rmsnorm": 5, "swiglu": 2}
            batch, logps, lengths, kl, ref_logps = optimised_scores(
                model, ref, tok, items, with_kl, share_prefix, chunk_size, spec.needs_token_kl
            )
            if share_prefix:  # pairs, and KTO's examples with their mismatched completions, share prompts
                assert batch.position_ids is not None
            if packable and share_prefix:
                assert batch.input_ids.shape[0] < len(items)  # short ones packed beside the long one
            if kl is None:
                kl = results["plain"][2]  # not computed (nor read) for this loss; not compared below
        loss = loss_from(name, batch, logps, lengths, kl, ref_logps)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[label] = (logps.detach(), lengths, kl.detach(), ref_logps, loss.detach(), grads)
        if label == "plain":
            size = loss_size(name, batch, logps, lengths, kl, ref_logps)
    plain, fast = results["plain"], results["optimised"]
    # A token's KL is a full-vocabulary sum of terms as large as its log-probs that cancel to a small
    # value: its rounding is relative to the summed log-probs' size, not to its own (up to 6 x the
    # tolerance relative to its own size was seen).
    scales = {"kl": plain[0].abs().max(), "loss": size}
    for i, what in enumerate(["logps", "lengths", "kl", "reference logps", "loss"]):
        if what != "kl" or spec.needs_token_kl:
            assert close(fast[i], plain[i], scales.get(what)), what
    assert plain[2].abs().sum() > 0  # a real KL between different models
    assert set(plain[5]) == set(fast[5])
    for param, grad in plain[5].items():
        # relative to the gradient's norm: DPOP's lambda = 50 makes gradients ~10
        assert_f32_grad_close(fast[5][param], grad, param)


def test_values_do_not_depend_on_batch_neighbours_or_padding():
    """Grouped vs plain batches: an example's log-probs are the same alone or next to a much longer one."""
    tok = byte_tokenizer()
    t = PreferenceTokenizer(tok, 256)
    short = t.pair(PAIRS[0], 0)
    long = t.pair(PairExample("A much longer prompt " * 5, " and a long answer " * 4, " no", "d"), 1)
    model = tiny_llama(0)
    head = output_head(model)
    for share in (False, True):
        collate = PreferenceCollator(tok.pad_token_id, share_prefix=share)
        with torch.no_grad():
            alone = score_completions(head, completion_states(model, collate([short])))[0]
            mixed = score_completions(head, completion_states(model, collate([short, long])))[0]
        assert close(alone, mixed[[0, 2]]), share


def test_fused_token_kl_gradcheck():
    """_LinearHeadLogpsKL in float64: both outputs' gradients (w.r.t. hidden states and head weight)
    against finite differences, with chunks that split the positions unevenly."""
    from prefopt.models.logps import _LinearHeadLogpsKL

    torch.manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (5,))
    ref_hidden, ref_weight = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)

    def both(h, w):
        return _LinearHeadLogpsKL.apply(h, w, targets, ref_hidden, ref_weight, 2)

    assert torch.autograd.gradcheck(both, (hidden, weight))
    logps, kl = both(hidden, weight)
    logprobs = torch.log_softmax(hidden @ weight.T, -1)
    ref_logprobs = torch.log_softmax(ref_hidden @ ref_weight.T, -1)
    assert torch.allclose(logps, logprobs.gather(-1, targets[:, None]).squeeze(-1))
    assert torch.allclose(kl, (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1))


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_row_blocked_head_is_bitwise_the_whole_chunk_computation(amp):
    """The fused head runs its pointwise passes in blocks of rows (8 MB of fp32: 42 rows at
    V = 49152, so 97 positions in chunks of 64 make blocks of 42 + 22 and 33). Rows are independent,
    so log-probs and both gradients are bitwise those of the whole-chunk passes written out here:
    lse = logsumexp(logits), logp = logits[target] - lse, d/dlogits = g (onehot - exp(logits - lse)),
    the weight gradient summed over chunks in fp32."""
    from prefopt.models.logps import _LinearHeadLogps

    torch.manual_seed(0)
    n, vocab, width, chunk = 97, 49152, 16, 64
    hidden = torch.randn(n, width, requires_grad=True)
    weight = (0.1 * torch.randn(vocab, width)).requires_grad_()
    targets, grad = torch.randint(0, vocab, (n,)), torch.randn(n)
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        logps = _LinearHeadLogps.apply(hidden, weight, targets, chunk)
        (logps * grad).sum().backward()
        h, w = (hidden.detach().to(amp), weight.detach().to(amp)) if amp else (hidden.detach(), weight.detach())
        expected_logps, grad_hidden, grad_weight = [], [], torch.zeros(vocab, width)
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            logits = torch.nn.functional.linear(h[sl], w).float()
            lse = torch.logsumexp(logits, dim=-1)
            expected_logps.append(logits.gather(-1, targets[sl, None]).squeeze(-1) - lse)
            g = grad[sl, None]
            d = logits.sub_(lse[:, None]).exp_().mul_(-g).scatter_add_(-1, targets[sl, None], g).to(w.dtype)
            grad_hidden.append((d @ w).float())
            grad_weight.add_(d.T @ h[sl])
    assert torch.equal(logps, torch.cat(expected_logps))
    assert torch.equal(hidden.grad, torch.cat(grad_hidden))
    assert torch.equal(weight.grad, grad_weight)


def test_fused_and_checkpointed_token_kl_paths_agree():
    """TDPO's KL through the fused linear-head function and through the generic checkpointed chunks
    (taken for heads that are not a plain bias-free Linear): same values and gradients."""
    tok, items = tokenized("tdpo1", PAIRS + [LONG_PAIR])
    results = []
    for wrap in (False, True):
        model, ref = tiny_llama(0).train(), tiny_llama(1)
        batch = PreferenceCollator(tok.pad_token_id, share_prefix=True)(items)
        _, ref_states, ref_head = ModelReference(ref, chunk_size=3)(model, batch, keep_states=True)
        head = torch.nn.Sequential(output_head(model)) if wrap else output_head(model)
        logps, _, kl = score_completions(head, completion_states(model, batch), 3, ref_head, ref_states)
        (logps.sum() + 3 * kl.sum()).backward()
        results.append((logps.detach(), kl.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logps_a, kl_a, grads_a), (logps_b, kl_b, grads_b) = results
    assert close(logps_b, logps_a) and close(kl_b, kl_a, logps_a.abs().max())  # KL: see above
    for name, grad in grads_a.items():
        assert_f32_grad_close(grads_b[name], grad, name)


def test_scoring_takes_only_the_last_hidden_state():
    """`last_hidden_state` reads the decoder stack's output with a hook: the same tensor as
    hidden_states[-1], without asking the model for every layer's states (in a no-grad forward
    nothing else keeps them), and with a PEFT wrapper around the model too."""
    from peft import LoraConfig, get_peft_model

    from prefopt.models.logps import last_hidden_state

    model = tiny_llama(0)
    ids = torch.randint(1, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    expected = model(**kwargs, output_hidden_states=True).hidden_states[-1]
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    got = last_hidden_state(model, kwargs)
    hook.remove()
    assert torch.equal(got, expected)
    assert not seen[-1].get("output_hidden_states") and seen[-1]["logits_to_keep"] == 1
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert torch.equal(last_hidden_state(wrapped, kwargs), expected)  # B = 0: the base model's states


def test_masked_grouped_query_attention_without_repeated_heads_scores_the_same():
    """Prefix sharing's 4-D mask made transformers copy each key/value head per query head before
    SDPA; on a CPU, prefopt lets SDPA take the grouped heads (`grouped_query_attention_in_sdpa`).
    The shared-layout log-probs are bitwise the same and the gradients agree to fp32 rounding (the
    kernel sums each key/value head's gradient over its group itself)."""
    import os

    from prefopt.compat import SDPA_GQA_ENV, grouped_query_attention_in_sdpa

    assert SDPA_GQA_ENV not in os.environ
    tokenizer, items = tokenized("dpo", [*PAIRS, LONG_PAIR])
    model = tiny_llama(3).train()  # 4 query heads over 2 key/value heads
    batch = PreferenceCollator(tokenizer.pad_token_id, share_prefix=True)(items)
    assert batch.attention_mask.dim() == 4

    key_heads = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, key, *args, **kwargs):
        key_heads.append(key.shape[1])
        return sdpa(query, key, *args, **kwargs)

    def scores():
        model.zero_grad()
        logps, _, _ = score_completions(output_head(model), completion_states(model, batch))
        logps.sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    torch.nn.functional.scaled_dot_product_attention = recording_sdpa
    try:
        repeated, repeated_grads = scores()
        assert set(key_heads) == {4}  # each key/value head copied for its 2 query heads
        key_heads.clear()
        with grouped_query_attention_in_sdpa("cpu"):
            assert os.environ[SDPA_GQA_ENV] == "1"
            grouped, grouped_grads = scores()
        assert set(key_heads) == {2}  # as the model has them
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    assert SDPA_GQA_ENV not in os.environ  # put back
    assert torch.equal(repeated, grouped)
    for name, grad in repeated_grads.items():
        assert_f32_grad_close(grouped_grads[name], grad, name)
