"""The batch layout of a run: are prompts shared (one forward over [prompt; chosen; rejected],
DESIGN §1), or does every completion get a row of its own?"""

from __future__ import annotations

import torch

from prefopt.data import PreferenceCollator, PreferenceTokenizer
from prefopt.models.windows import shared_layout_is_exact


def choose_share_prefix(config, spec, model, tokenizer, items: list, use_logits: bool) -> bool:
    """Share prompts when the loss's rows can (pairs; KTO's examples and their mismatched KL
    completions; rollouts' groups), the config asks for it, the layout is exact for this model's
    attention windows, and the model takes a custom 4-D mask; each refusal says why in one line.
    A sequence classifier pools one score per row, so it needs one row per sequence."""
    layout_shares = (spec.paired or spec.needs_kl_pairs or spec.needs_rollouts) and not spec.needs_sequence_scores
    if not (config.share_prefix and layout_shares):
        return False
    exact, why_not = shared_layout_is_exact(model, longest_row(config, spec, items))
    if not exact:
        print(f"prefopt: prompts are not shared: {why_not}, which a shared layout's mask cannot hold")
        return False
    if not shared_prefix_works(model, tokenizer, use_logits):
        print("prefopt: this model does not take a custom 4-D attention mask; prompts are not shared")
        return False
    return True


def longest_row(config, spec, items: list) -> int:
    """How far positions run in one branch of a row: the token budget offline; a rollout's
    prompt (as tokenized) plus its completion budget online."""
    if spec.needs_rollouts:
        return max((len(item.prompt_ids) for item in items), default=0) + config.max_new_tokens
    return config.max_length


def shared_prefix_works(model, tokenizer, use_logits: bool) -> bool:
    """Does this model honour a custom 4-D mask and position ids? Compare both layouts on one pair."""
    from prefopt.data import PairExample
    from prefopt.models.logps import score_model

    pair = PreferenceTokenizer(tokenizer, 64).pair(PairExample("Is the sky blue?", " Yes, it is.", " No.", ""), 0)
    device = next(model.parameters()).device
    results = []
    with torch.no_grad():
        for share in (False, True):
            batch = PreferenceCollator(tokenizer.pad_token_id, share_prefix=share)([pair]).to(device)
            try:
                results.append(score_model(model, batch, use_logits)[0][0])
            except Exception:  # a model that rejects 4-D masks or position ids: use the plain layout
                return False
    return torch.allclose(results[0], results[1], atol=1e-3, rtol=1e-4)
