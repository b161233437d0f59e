"""Sharded engines (DeepSpeed ZeRO) for the models a run builds beside the policy.

transformers' Trainer hands the policy to DeepSpeed itself. The frozen reference copy is not
trained, so nothing hands it over: under ZeRO-3 it gets its own inference engine, partitioned
across the processes like the policy (each holds 1/N of its weights); under ZeRO-1/2 each
process keeps a whole copy (stage 0), as the policy's weights are whole there too. This is TRL's
`prepare_deepspeed` (trl/models/utils.py), with the hidden-size-dependent buckets set as nested
keys of the DeepSpeed config.
"""

from __future__ import annotations

import copy


def deepspeed_inference_engine(model, accelerator):
    """`model` wrapped in a DeepSpeed engine without an optimizer, in eval mode."""
    import deepspeed  # only under DeepSpeed: importing it sets up its accelerator

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    text_config = model.config.get_text_config()
    hidden = max(getattr(text_config, "hidden_sizes", None) or [getattr(text_config, "hidden_size", 0) or 0])
    if zero.get("stage") == 3 and hidden:
        zero["reduce_bucket_size"] = hidden * hidden
        zero["stage3_param_persistence_threshold"] = 10 * hidden
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
    # no optimizer here: the training-only blocks would make DeepSpeed build one (or a scheduler)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero.pop("offload_optimizer", None)
    if zero.get("stage") != 3:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def sharding_summary(trainer) -> dict | None:
    """How the policy's weights were held (summary.json's `sharding`), under DeepSpeed: the ZeRO
    stage and the share of the weights this process kept (ZeRO-3: about 1 / processes)."""
    if not trainer.is_deepspeed_enabled:
        return None
    params = list(trainer.model.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return {
        "engine": "deepspeed",
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "processes": trainer.args.world_size,
        "weights_held_by_the_main_process": round(held / max(total, 1), 4),
    }
