"""Model outputs -> per-sequence completion log-probs, lengths and token-level KL.

Memory: the B x T x V logits tensor is never built. The model runs once with
`logits_to_keep=1` (through its own forward, so DDP/FSDP and PEFT wrappers see a normal call),
its final hidden states taken from the decoder stack's output; the output head is then applied only at completion
positions, in chunks of `chunk_size` tokens, so at most one chunk of logits (chunk_size x V)
is alive at a time, in forward and in backward: for a plain linear head through a fused
autograd function (`_LinearHeadLogps`), otherwise through activation checkpointing per chunk.

TDPO's KL(pi_ref(.|x,y<t) || pi_theta(.|x,y<t)) is computed in the same chunks from the
reference's hidden states at the same positions (full vocabulary), then summed per sequence:
fused (`_LinearHeadLogpsKL`) when both heads are plain linear layers, else checkpointed.

Mixed precision (bf16/fp16 autocast): the head's matmuls run in the low precision (they are a
fifth of a small model's FLOPs), but logsumexp, log-probs, the KL's vocabulary sums and the
per-sequence sums are fp32: DPO takes small differences of these large sums. The fused functions'
backward runs under the autocast their forward ran under, so recomputed logits match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from prefopt.compat import attention_implementation
from prefopt.models.precision import autocast_dtype


@dataclass
class CompletionStates:
    """Final hidden states at the positions that predict completion tokens."""

    hidden: torch.Tensor  # (K, H)
    targets: torch.Tensor  # (K,) the completion token each position predicts
    rows: torch.Tensor  # (K,) which sequence each position belongs to
    num_rows: int


def output_head(model) -> torch.nn.Module:
    """The LM head of a (possibly PEFT- or DDP-wrapped) causal LM."""
    inner = getattr(model, "module", model)  # DDP / DataParallel
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    return inner.get_output_embeddings()


def _attention_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """2-D masks go to the model as they are. A 4-D boolean mask (shared-prefix layout) goes to
    SDPA as booleans and to eager attention as an additive float mask."""
    if mask.dim() != 4:
        return mask
    if attention_implementation(model) == "sdpa":
        return mask
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def completion_states(model, batch, use_logits: bool = False) -> CompletionStates:
    """One forward pass over `batch` (a SequenceBatch); keep the states that predict completion tokens.

    use_logits=True keeps the model's own logits instead (for heads that are not a plain
    projection of the last hidden state); score them with `torch.nn.Identity()` as the head.
    """
    kwargs = {
        "input_ids": batch.input_ids,
        "attention_mask": _attention_mask(model, batch.attention_mask),
        "use_cache": False,
    }
    if batch.position_ids is not None:
        kwargs["position_ids"] = batch.position_ids
    hidden = model(**kwargs).logits if use_logits else last_hidden_state(model, kwargs)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return CompletionStates(
        hidden=flat[batch.predict_from], targets=batch.predict_token, rows=batch.predict_row, num_rows=batch.num_rows
    )


def _decoder(model) -> torch.nn.Module | None:
    """The decoder stack inside a (possibly PEFT-, DDP- or DeepSpeed-wrapped) causal LM, or None."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    get_decoder = getattr(inner, "get_decoder", None)
    try:
        decoder = get_decoder() if get_decoder is not None else None
    except (AttributeError, NotImplementedError, ValueError):
        return None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not inner else None


def last_hidden_state(model, kwargs: dict) -> torch.Tensor:
    """The final hidden states of one forward of `model` (through its own forward, so wrappers see
    a normal call), with one position of logits (`logits_to_keep=1`).

    Taken from the decoder stack's output by a forward hook rather than with
    `output_hidden_states=True`, which keeps every layer's states until the forward returns: in the
    no-grad forwards (the reference, evaluation, sampling's scoring) nothing else holds them, so that
    is layers x positions x hidden of memory for nothing. A model without a separable decoder takes
    the `output_hidden_states` path; `head_matches_model` checks the result either way."""
    decoder = _decoder(model)
    if decoder is None:
        return model(**kwargs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    captured = []
    hook = decoder.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(**kwargs, logits_to_keep=1)
    finally:
        hook.remove()
    output = captured[-1]
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def head_matches_model(model, vocab_probe: torch.Tensor) -> bool:
    """True when logits == head(last hidden state) for this architecture (no soft-capping or
    scaling), with the last hidden state taken as training takes it (`last_hidden_state`).

    Checked once on a few tokens; when False, the trainer falls back to the model's full logits.
    """
    with torch.no_grad():
        kwargs = {"input_ids": vocab_probe, "attention_mask": torch.ones_like(vocab_probe), "use_cache": False}
        logits = model(**kwargs).logits
        from_head = output_head(model)(last_hidden_state(model, kwargs))
        return torch.allclose(from_head.float(), logits.float(), atol=1e-4, rtol=1e-4)


def _chunk_scores(head_weight_owner, hidden, targets, ref_hidden, ref_head):
    logits = head_weight_owner(hidden).float()
    logprobs = F.log_softmax(logits, dim=-1)
    token_logps = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    if ref_hidden is None:
        return token_logps, torch.zeros_like(token_logps)
    with torch.no_grad():
        ref_logprobs = F.log_softmax(ref_head(ref_hidden).float(), dim=-1)
    # KL(ref || policy) = sum_v p_ref * (log p_ref - log p_policy)
    kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
    return token_logps, kl


def _same_autocast(ctx):
    """Backward under the autocast the forward ran under (as `torch.amp.custom_bwd` does), so the
    logits it recomputes are the forward's own: softmax = exp(logits - lse) with both from one matmul."""
    return torch.autocast(ctx.device_type, dtype=ctx.amp or torch.float32, enabled=ctx.amp is not None)


def _save_autocast(ctx, tensor: torch.Tensor) -> None:
    ctx.device_type = tensor.device.type
    ctx.amp = autocast_dtype(ctx.device_type)


def _no_autocast(tensor: torch.Tensor):
    return torch.autocast(tensor.device.type, enabled=False)


def _linear(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight^T in the wider of the two dtypes (autocast off: fp32 states with fp32 weights)."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return F.linear(hidden.to(dtype), weight.to(dtype))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[i, v] * b[i, v] per row, in the inputs' dtype even under autocast (bmm is on
    autocast's low-precision list, and these are sums over the whole vocabulary)."""
    with _no_autocast(a):
        return torch.bmm(a[:, None, :], b[:, :, None]).view(-1)


def _head_backward(grad_logits, hidden, weight, sl, grad_hidden, grad_weight, want_weight: bool, acc: torch.dtype):
    """One chunk's d loss / d logits -> the hidden states' rows `sl` and the head weight; returns the
    weight gradient accumulated so far (None until the first chunk, which starts it without a zeroed
    vocabulary x hidden buffer).

    Under autocast (mixed precision) both matmuls run in its low precision, as the forward's did;
    the weight gradient still accumulates over chunks in `acc` (fp32).
    """
    grad_logits = grad_logits.to(weight.dtype)
    if grad_hidden is not None:
        grad_hidden[sl] = grad_logits @ weight
    if not want_weight:
        return None
    if torch.is_autocast_enabled(grad_logits.device.type):  # in-place addmm_ would bypass autocast
        part = grad_logits.T @ hidden[sl]
        return part.to(acc) if grad_weight is None else grad_weight.add_(part)
    if grad_weight is None:
        return torch.mm(grad_logits.T.to(acc), hidden[sl].to(acc))
    return grad_weight.addmm_(grad_logits.T.to(acc), hidden[sl].to(acc))


def _row_blocks(rows: int, vocab: int):
    """Slices of about 8 MB of fp32 rows of a chunk x vocabulary tensor (42 rows at V = 49k).

    The fused heads keep the chunk's matmul whole (its speed needs the rows) but run the pointwise
    passes (the fp32 copy, logsumexp, exp, the gradient's in-place updates) block by block. On a CPU a
    fresh tensor of a whole chunk (575 x 49k fp32: 113 MB) is a new memory mapping that the kernel
    faults in page by page (a non-in-place subtraction over it took 185 ms, the same in place 7 ms);
    a block's temporaries come from the heap and stay in cache. Rows are independent, so the results
    are bitwise those of whole-chunk passes.
    """
    step = max(1, (8 << 20) // (4 * vocab))
    for start in range(0, rows, step):
        yield slice(start, start + step)


class _LinearHeadLogps(torch.autograd.Function):
    """log softmax(h W^T)[target] per position, chunk by chunk, for a bias-free linear head.

    Forward keeps only h, W, the targets and one logsumexp per position; backward recomputes
    each chunk's logits once and turns them in place into the gradient
    d logp / d logits = onehot(target) - softmax, so one chunk x vocabulary buffer is alive at
    a time (the checkpointed generic path needs logits, log-softmax and their gradients).
    Same idea as Liger-Kernel's fused linear cross-entropy, per token rather than per pair.

    Under autocast the states and the weight are cast to its dtype once, up front, and those copies
    are what backward uses: the matmuls are the ones autocast would run (bitwise), without a cast
    of the vocabulary x hidden weight per chunk and again in backward (a frozen weight, such as the
    reference's or a tied head's, is not in autocast's cache).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        _save_autocast(ctx, hidden)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if ctx.amp is not None:
            hidden, weight = hidden.to(ctx.amp), weight.to(ctx.amp)
        logps = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logps)
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            logits = F.linear(hidden[sl], weight)
            chunk_lse = lse[sl]
            for rows in _row_blocks(logits.shape[0], logits.shape[1]):
                chunk_lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
            logps[sl] = logits.gather(-1, targets[sl, None]).squeeze(-1).float() - chunk_lse
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets, lse = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty(hidden.shape, device=hidden.device, dtype=hidden_dtype) if want_hidden else None
        grad_weight = None
        with _same_autocast(ctx):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                sl = slice(start, start + ctx.chunk_size)
                g, chunk_lse, chunk_targets = grad_logps[sl, None].float(), lse[sl, None], targets[sl, None]
                grad_logits = F.linear(hidden[sl], weight)  # the logits, turned into their gradient in place
                for rows in _row_blocks(grad_logits.shape[0], grad_logits.shape[1]):
                    block = grad_logits[rows].float()  # (a view when the logits are fp32)
                    block.sub_(chunk_lse[rows]).exp_().mul_(-g[rows])  # -g * softmax
                    block.scatter_add_(-1, chunk_targets[rows], g[rows])  # + g * onehot(target)
                    if block.dtype != grad_logits.dtype:
                        grad_logits[rows] = block
                grad_weight = _head_backward(
                    grad_logits, hidden, weight, sl, grad_hidden, grad_weight, want_weight, torch.float32
                )
                del grad_logits
        if want_weight:
            grad_weight = grad_weight.to(weight_dtype)
        return grad_hidden, grad_weight, None, None


class _LinearHeadLogpsKL(torch.autograd.Function):
    """`_LinearHeadLogps` plus TDPO's token KL(pi_ref || pi_theta), for bias-free linear heads.

    With z the policy logits, q = softmax(z) and p the reference's distribution at that position,
    KL = sum_v p_v log p_v - sum_v p_v z_v + logsumexp(z) (as sum_v p_v = 1), and
    d KL / d z = q - p, d logp[target] / d z = onehot(target) - q. Forward keeps h, W, the
    reference's h and W and one logsumexp per position each; backward recomputes both chunks of
    logits and forms g_kl (q - p) + g_logp (onehot - q) in place: two chunk x vocabulary buffers
    alive, where the checkpointed generic path holds about seven (logits, log-softmax, their
    reference twins, the product and the gradients).

    Under mixed precision the KL runs in fp32 throughout (autocast off): it compares two
    distributions that differ by less than bf16 resolves in the logits, so bf16 logits would make
    it noise. The log-probs, though, come from the autocast logits, as `_LinearHeadLogps` computes
    the reference's: a policy equal to its reference then has log-ratios of exactly 0. That costs
    one more chunk of logits in forward and backward, for TDPO under autocast only.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ref_hidden, ref_weight, chunk_size):
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least (float64 stays, for gradcheck)
        _save_autocast(ctx, hidden)
        logps = torch.empty(n, device=hidden.device, dtype=acc)
        kl = torch.empty_like(logps)
        lse, ref_lse = torch.empty_like(logps), torch.empty_like(logps)
        low_lse = torch.empty_like(logps) if ctx.amp is not None else lse
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            if ctx.amp is not None:  # the log-probs as _LinearHeadLogps makes them under this autocast
                low = F.linear(hidden[sl], weight).to(acc)
                low_lse[sl] = torch.logsumexp(low, dim=-1)
                logps[sl] = low.gather(-1, targets[sl, None]).squeeze(-1) - low_lse[sl]
                del low
            with _no_autocast(hidden):
                logits = _linear(hidden[sl], weight).to(acc)
                lse[sl] = torch.logsumexp(logits, dim=-1)
                if ctx.amp is None:
                    logps[sl] = logits.gather(-1, targets[sl, None]).squeeze(-1) - lse[sl]
                ref_logp = _linear(ref_hidden[sl], ref_weight).to(acc)
                ref_lse[sl] = torch.logsumexp(ref_logp, dim=-1)
                ref_logp.sub_(ref_lse[sl, None])
                ref_p = ref_logp.exp()
                # sum_v p (log p - z) + logsumexp(z), as row-wise dot products (no third buffer)
                ref_logp.sub_(logits)
                kl[sl] = _rowdot(ref_p, ref_logp) + lse[sl]
                del logits, ref_logp, ref_p
        ctx.save_for_backward(hidden, weight, targets, lse, ref_hidden, ref_weight, ref_lse, low_lse)
        ctx.chunk_size = chunk_size
        return logps, kl

    @staticmethod
    def backward(ctx, grad_logps, grad_kl):
        hidden, weight, targets, lse, ref_hidden, ref_weight, ref_lse, low_lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        acc = lse.dtype
        grad_weight = None
        if grad_logps is None:
            grad_logps = torch.zeros_like(lse)
        if grad_kl is None:
            grad_kl = torch.zeros_like(lse)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            g_logp, g_kl = grad_logps[sl, None].to(acc), grad_kl[sl, None].to(acc)
            low_q = None
            if ctx.amp is not None:  # - g_logp q, with q from the autocast logits the log-probs came from
                with _same_autocast(ctx):
                    low_q = F.linear(hidden[sl], weight).to(acc)
                low_q.sub_(low_lse[sl, None]).exp_().mul_(g_logp)
            with _no_autocast(hidden):
                grad_logits = _linear(hidden[sl], weight).to(acc)
                if low_q is None:
                    grad_logits.sub_(lse[sl, None]).exp_().mul_(g_kl - g_logp)  # (g_kl - g_logp) q
                else:
                    grad_logits.sub_(lse[sl, None]).exp_().mul_(g_kl).sub_(low_q)
                    del low_q
                ref_p = _linear(ref_hidden[sl], ref_weight).to(acc)
                ref_p.sub_(ref_lse[sl, None]).exp_().mul_(g_kl)
                grad_logits.sub_(ref_p)  # - g_kl p
                del ref_p
                grad_logits.scatter_add_(-1, targets[sl, None], g_logp)  # + g_logp onehot(target)
                grad_weight = _head_backward(
                    grad_logits, hidden, weight, sl, grad_hidden, grad_weight, want_weight, acc
                )
                del grad_logits
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def weight_is_whole(weight: torch.Tensor) -> bool:
    """False for a parameter that a sharding engine keeps in pieces between module calls: a
    DeepSpeed ZeRO-3 parameter (outside its module's call it is a `[0]`-shaped placeholder with
    `ds_id`) or an FSDP2 DTensor. Such a weight may only be used by calling its module."""
    return not hasattr(weight, "ds_id") and type(weight).__name__ != "DTensor" and weight.numel() > 0


def _fused_weight(head: torch.nn.Module) -> torch.Tensor | None:
    """The weight the fused functions use for a bias-free Linear head, or None (the generic path).

    A whole weight is used as it is. A sharded one (ZeRO-3, FSDP2; DESIGN §7) is never read as it
    lies: a frozen one (a LoRA base's head, the reference's) is gathered explicitly into a whole
    copy for this call, which needs no gradient; a trained one returns None, so the checkpointed
    path calls the head module chunk by chunk (in forward and again in backward) and the engine
    gathers the weight, and reduces its gradient, for each call.
    """
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    weight = head.weight
    if weight_is_whole(weight):
        return weight
    if weight.requires_grad:
        return None
    if type(weight).__name__ == "DTensor":
        return weight.full_tensor().detach()
    import deepspeed  # a ZeRO-3 parameter: DeepSpeed is what partitioned it

    with deepspeed.zero.GatheredParameters([weight]):
        return weight.detach().clone()


def score_completions(
    head: torch.nn.Module,
    states: CompletionStates,
    chunk_size: int = 1024,
    ref_head: torch.nn.Module | None = None,
    ref_states: CompletionStates | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed logps (N,), lengths (N,), summed token KL (N,) or None) per sequence."""
    want_kl = ref_states is not None
    if not want_kl:
        return _per_sequence(completion_token_logps(head, states, chunk_size), states) + (None,)
    weight = _fused_weight(head) if want_kl else None
    ref_weight = _fused_weight(ref_head) if weight is not None else None
    if weight is not None and ref_weight is not None:
        token_logps, token_kl = _LinearHeadLogpsKL.apply(
            states.hidden, weight, states.targets, ref_states.hidden.detach(), ref_weight.detach(), chunk_size
        )
        logps, lengths = _per_sequence(token_logps, states)
        kl = torch.zeros(states.num_rows, device=token_kl.device, dtype=torch.float32).index_add(
            0, states.rows, token_kl
        )
        return logps, lengths, kl
    pieces_logp, pieces_kl = [], []
    grad = torch.is_grad_enabled() and states.hidden.requires_grad
    for start in range(0, states.hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (head, states.hidden[sl], states.targets[sl], ref_states.hidden[sl] if want_kl else None, ref_head)
        if grad:
            # Recompute this chunk's logits in backward instead of keeping them.
            logp, kl = checkpoint(_chunk_scores, *args, use_reentrant=False)
        else:
            logp, kl = _chunk_scores(*args)
        pieces_logp.append(logp)
        pieces_kl.append(kl)
    device = states.hidden.device
    token_logps = torch.cat(pieces_logp) if pieces_logp else torch.zeros(0, device=device)
    logps, lengths = _per_sequence(token_logps, states)
    kl = None
    if want_kl:
        token_kl = torch.cat(pieces_kl) if pieces_kl else torch.zeros(0, device=device)
        kl = torch.zeros(states.num_rows, device=device, dtype=torch.float32).index_add(0, states.rows, token_kl)
    return logps, lengths, kl


class _Tempered(torch.nn.Module):
    """A head whose logits are divided by a sampling temperature (a head with a bias, or another module)."""

    def __init__(self, head: torch.nn.Module, temperature: float):
        super().__init__()
        self.head, self.temperature = head, temperature

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) / self.temperature


def completion_token_logps(
    head: torch.nn.Module, states: CompletionStates, chunk_size: int = 1024, temperature: float = 1.0
) -> torch.Tensor:
    """The log-prob of each completion token (K,), chunked as `score_completions` (policy-gradient
    losses weight each token by its own advantage).

    `temperature`: the log-probs under the distribution the tokens were sampled from,
    log softmax(logits / T), as TRL's GRPOTrainer scores its samples (`selective_log_softmax` of
    `logits / self.temperature`, for the policy and the reference alike). For a bias-free linear
    head (and for logits) the states are divided instead: W (h / T) = (W h) / T, so the fused
    path still serves it."""
    hidden = states.hidden
    if temperature != 1.0:
        if isinstance(head, torch.nn.Identity) or (type(head) is torch.nn.Linear and head.bias is None):
            hidden = hidden / temperature
        else:
            head = _Tempered(head, temperature)
    weight = _fused_weight(head)
    if weight is not None:
        return _LinearHeadLogps.apply(hidden, weight, states.targets, chunk_size)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (head, hidden[start : start + chunk_size], states.targets[start : start + chunk_size], None, None)
        # with gradients, each chunk's logits are recomputed in backward instead of kept
        pieces.append((checkpoint(_chunk_scores, *args, use_reentrant=False) if grad else _chunk_scores(*args))[0])
    return torch.cat(pieces) if pieces else torch.zeros(0, device=hidden.device)


def score_model(
    model,
    batch,
    use_logits: bool = False,
    chunk_size: int = 1024,
    ref_head: torch.nn.Module | None = None,
    ref_states: CompletionStates | None = None,
):
    """One forward of `model` over `batch`, then its completion scores.

    Returns ((logps, lengths, kl), states, head): the scores of `score_completions`, and the
    states and head that produced them (a reference hands these to the policy for token KL).
    With use_logits the model's own logits are scored (the head is the identity).
    """
    states = completion_states(model, batch, use_logits)
    head = torch.nn.Identity() if use_logits else output_head(model)
    return score_completions(head, states, chunk_size, ref_head, ref_states), states, head


def _per_sequence(token_logps: torch.Tensor, states: CompletionStates) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, completion lengths) per sequence."""
    zeros = torch.zeros(states.num_rows, device=token_logps.device, dtype=torch.float32)
    return zeros.index_add(0, states.rows, token_logps), zeros.index_add(0, states.rows, torch.ones_like(token_logps))


def full_logits_scores(model, input_ids, attention_mask, completion_mask, ref_logits=None):
    """Plain path (all logits materialised): the fallback for heads we cannot split off, and the
    reference the tests compare the chunked path against. Returns logps, lengths, kl, logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    logprobs = F.log_softmax(logits, dim=-1)
    mask = completion_mask[:, 1:].float()
    token_logps = logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    kl = None
    if ref_logits is not None:
        ref_logprobs = F.log_softmax(ref_logits.float(), dim=-1)
        kl = ((ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1) * mask).sum(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1), kl, logits
