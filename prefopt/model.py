"""Load the policy (full, LoRA, or 4-bit QLoRA) and, when a loss needs one, its reference."""

from __future__ import annotations

import warnings

import torch

from prefopt.config import ConfigError, TrainConfig
from prefopt.hub import load_tokenizer, resolve_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """The dtype to load a model in for inference (auto: bf16 on a GPU that has it, else fp32)."""
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"dtype must be auto, {', '.join(_DTYPES)}; got '{name}'")
    return _DTYPES[name]


def training_dtype(name: str) -> torch.dtype:
    """The dtype a trained model's weights are kept in. auto is float32 everywhere: the master
    weights that mixed precision computes from in bf16 where the hardware has bf16 units
    (prefopt.precision); bf16 weights under a plain AdamW would drop DPO-sized updates."""
    return torch.float32 if name == "auto" else resolve_dtype(name)


def _load_causal_lm(config: TrainConfig, dtype: torch.dtype, name: str | None = None):
    """The causal LM `name` (default: config.model) with the config's dtype and quantisation."""
    from transformers import AutoModelForCausalLM

    name = name or config.model

    kwargs = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    location = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as error:
        raise ConfigError(f"cannot load model '{name}': {str(error).splitlines()[0]}") from None
    if config.load_in_4bit:
        keep_4bit_layers_unpacked(model)
    return model


def keep_4bit_layers_unpacked(model) -> int:
    """Turn off bitsandbytes' packed AVX512-BF16 CPU layout on every 4-bit layer; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) rewrites a `Linear4bit`'s weight into a packed
    layout the first time the layer runs an eval-mode, no-grad forward (`support_avx512bf16_for_cpu`),
    and never converts it back. For a model that trains, that is wrong in three ways:
    - the packed layout needs in_features a multiple of the quantisation block (64) and out_features
      a multiple of 32; any other layer crashes the evaluation (`shape '[32, 0]' is invalid`);
    - the packed kernel (`gemv_4bit`) has no autograd formula, so every training step after the
      first evaluation backpropagates zero through the frozen base weights: the adapters of all
      earlier layers get wrong gradients, with only a torch warning to show for it;
    - it computes in bfloat16 while training computes in the compute dtype, so evaluation and
      training (and a 4-bit reference copy against the policy) would score the same text differently.
    With the flag off, bitsandbytes dequantises and multiplies as it does on every other CPU.
    """
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def _lora_config(config: TrainConfig):
    from peft import LoraConfig

    targets = config.lora_target_modules
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type="CAUSAL_LM",
    )


def load_policy(config: TrainConfig):
    """(model, tokenizer). With LoRA the model is a PEFT model whose base weights are frozen."""
    dtype = training_dtype(config.dtype)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    model = _load_causal_lm(config, dtype)
    model.config.use_cache = False
    if config.lora:
        from peft import get_peft_model, prepare_model_for_kbit_training

        with warnings.catch_warnings():
            # peft reads the model's `is_gradient_checkpointing`, an alias transformers 5 deprecated
            # (FutureWarning on every LoRA run); it is peft's call to update, not the user's.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            if config.load_in_4bit:
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
            model = get_peft_model(model, _lora_config(config))
    if config.lean_activations:
        from prefopt.lean import make_lean

        make_lean(model)  # after LoRA: projections it wrapped keep their own forward
    return model, tokenizer


def load_reference_copy(config: TrainConfig):
    """A frozen copy of the reference: `reference_model`, else the policy's starting weights
    (4-bit too when the policy is)."""
    model = _load_causal_lm(config, training_dtype(config.dtype), config.reference_model)
    model.eval()
    model.requires_grad_(False)
    return model
