"""Attention windows, and whether the shared-prefix layout is exact for a model (DESIGN §7).

The shared-prefix layout hands the model a custom 4-D mask, which transformers passes to every
layer unchanged: it has to say everything the model's own masks would, windows included.
"""

from __future__ import annotations


def attention_window(config) -> int | None:
    """The shortest attention span any layer of this model config has: a sliding window (Mistral,
    Phi-3, Gemma-2/3's sliding layers, Qwen2 with use_sliding_window) or a chunk (Llama-4's
    chunked layers), in tokens; None when every layer attends to the whole history.

    Why it matters: transformers hands a custom 4-D mask (the shared-prefix layout's) to every
    layer unchanged, so windowed layers would see the whole history under it. A layout is exact
    anyway when no row has positions further apart than the window (`shared_layout_is_exact`).
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None)
    spans = []
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        if layer_types is None or "sliding_attention" in layer_types:
            spans.append(int(window))
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk and (layer_types is None or "chunked_attention" in layer_types):
        spans.append(int(chunk))
    return min(spans) if spans else None


def shared_layout_is_exact(model, longest: int) -> tuple[bool, str]:
    """(exact, why not) for the shared-prefix layout on rows whose positions run up to `longest`.

    A token at position p sees positions p - window + 1 .. p in a windowed layer. In the shared
    layout each branch restarts its positions after the prompt, so if every position is below the
    window, no layer would have cut anything off in the plain layout either, and the custom mask
    says all there is to say. Otherwise the run uses the plain layout.
    """
    inner = getattr(model, "module", model)
    window = attention_window(getattr(inner, "config", None))
    if window is None or longest <= window:
        return True, ""
    return False, f"its attention window ({window} tokens) is shorter than a sequence ({longest} tokens)"
