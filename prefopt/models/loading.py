"""Load the policy (full, LoRA, or 4-bit QLoRA) and, when a loss needs one, its reference.

The policy is a causal LM, or, for a loss that trains a reward model (`needs_sequence_scores`),
the same weights as a sequence classifier with one output (a new `score` head on the backbone).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from prefopt.config import ConfigError, TrainConfig
from prefopt.models.hub import load_tokenizer, resolve_model

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
    (prefopt.models.precision); bf16 weights under a plain AdamW would drop DPO-sized updates."""
    return torch.float32 if name == "auto" else resolve_dtype(name)


def _load_causal_lm(
    config: TrainConfig,
    dtype: torch.dtype,
    name: str | None = None,
    classifier: bool = False,
    compute_dtype: torch.dtype | None = None,
):
    """The causal LM `name` (default: config.model) with the config's dtype and quantisation.

    classifier=True: the same weights as a sequence classifier with one output (num_labels=1).
    compute_dtype: the autocast dtype of the run (None: no autocast). A 4-bit layer dequantises its
    weight into its compute dtype for every matmul; under autocast that is the autocast dtype, as
    the matmul runs there anyway (dequantising to fp32 would write twice the bytes, then be cast).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name = name or config.model

    kwargs = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
    if classifier:
        kwargs["num_labels"] = 1
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or dtype,
            # the new score head is trained in full precision, never quantised
            llm_int8_skip_modules=["score"] if classifier else None,
        )
    if config.load_in_4bit and torch.cuda.is_available():
        # bitsandbytes quantises while loading onto the device and its layers cannot move after, so
        # each process loads onto its own GPU (without a map every rank would fill GPU 0)
        from prefopt.models.inference import inference_device

        kwargs["device_map"] = {"": inference_device()}
    location = resolve_model(name)
    try:
        if classifier:
            with expect_new_score_head():
                model = AutoModelForSequenceClassification.from_pretrained(location, **kwargs)
        else:
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


@contextlib.contextmanager
def expect_new_score_head():
    """Loading a causal LM's checkpoint as a sequence classifier: the new `score` head is missing
    from it and its `lm_head` is unused, both by design, so transformers' load report about them is
    noise. The class attributes that silence it are put back afterwards (as TRL's RewardTrainer does)."""
    from transformers.modeling_layers import GenericForSequenceClassification as Generic

    added = {"_keys_to_ignore_on_load_missing": r"^score\.weight$", "_keys_to_ignore_on_load_unexpected": r"^lm_head\."}
    saved = {name: Generic.__dict__[name] for name in added if name in Generic.__dict__}
    for name, pattern in added.items():
        setattr(Generic, name, [*(getattr(Generic, name, None) or []), pattern])
    try:
        yield
    finally:
        for name in added:
            if name in saved:
                setattr(Generic, name, saved[name])
            else:
                delattr(Generic, name)


def has_fused_experts(model: torch.nn.Module) -> bool:
    """Mixture-of-experts layers whose experts are one 3-D parameter (transformers 5's Qwen3-MoE,
    Mixtral, ...), which peft's LoRA wraps as parameters (`lora.ParamWrapper`), not as Linear layers."""
    return any(p.dim() == 3 for p in model.parameters())


def _lora_config(config: TrainConfig, task_type: str = "CAUSAL_LM", model=None):
    """task_type SEQ_CLS (a reward model): peft adds the `score` head to modules_to_save, so the
    new head is trained in full beside the adapters and saved with them.

    On a model with fused experts the adapters' dropout is 0: peft cannot apply dropout to the
    input of a wrapped parameter (it refuses: "lora.ParamWrapper does not work with lora_dropout
    != 0"), and one dropout for some adapters and none for others would be a quiet surprise."""
    from peft import LoraConfig

    targets = config.lora_target_modules
    dropout = config.lora_dropout
    if dropout and model is not None and has_fused_experts(model):
        print(
            f"prefopt: lora_dropout 0 (not {dropout}): this model's experts are fused weights, "
            "and peft's LoRA on them has no dropout"
        )
        dropout = 0.0
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type=task_type,
    )


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout of `model` to 0; returns how many were on.

    As TRL's `disable_dropout_in_model` (every `nn.Dropout` to p = 0), and also the rates that
    modules keep as plain floats and pass to `F.dropout` or to attention (Llama's and OPT's
    `attention_dropout`, OPT's `dropout` and `activation_dropout`). The model's config is left as
    it was, so a saved model keeps its own settings. Called before LoRA wraps the model, so the
    adapters' `lora_dropout` is the user's.
    """
    turned_off = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            turned_off += 1
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                turned_off += 1
    return turned_off


def load_policy(config: TrainConfig, sequence_classifier: bool = False, compute_dtype: torch.dtype | None = None):
    """(model, tokenizer). With LoRA the model is a PEFT model whose base weights are frozen.

    sequence_classifier=True (a loss with `needs_sequence_scores`): the model is loaded as a sequence
    classifier with one output and `config.pad_token_id` set (its forward refuses batches without
    one). prefopt pools each row itself, at its last real token by the attention mask, so pad == eos
    is safe here (transformers' own pooling skips a closing EOS then: TRL #937, transformers #35352).
    compute_dtype: the run's autocast dtype, for 4-bit layers (`_load_causal_lm`).
    """
    dtype = training_dtype(config.dtype)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    model = _load_causal_lm(config, dtype, classifier=sequence_classifier, compute_dtype=compute_dtype)
    if sequence_classifier:
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    if config.disable_dropout:
        disable_dropout(model)
    if config.lora:
        from peft import get_peft_model, prepare_model_for_kbit_training

        with warnings.catch_warnings():
            # peft reads the model's `is_gradient_checkpointing`, an alias transformers 5 deprecated
            # (FutureWarning on every LoRA run); it is peft's call to update, not the user's.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            if config.load_in_4bit:
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
            task = "SEQ_CLS" if sequence_classifier else "CAUSAL_LM"
            model = get_peft_model(model, _lora_config(config, task, model))
    if config.lean_activations:
        from prefopt.models.lean import make_lean

        make_lean(model)  # after LoRA: projections it wrapped keep their own forward
    return model, tokenizer


def load_reference_copy(config: TrainConfig, compute_dtype: torch.dtype | None = None):
    """A frozen copy of the reference: `reference_model`, else the policy's starting weights
    (4-bit too when the policy is, computing in the same dtype)."""
    model = _load_causal_lm(config, training_dtype(config.dtype), config.reference_model, compute_dtype=compute_dtype)
    if config.disable_dropout:  # eval mode turns nn.Dropout off; a float rate read without `training` stays
        disable_dropout(model)
    model.eval()
    model.requires_grad_(False)
    return model
