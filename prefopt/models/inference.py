"""Load a model for inference (sampling, scoring, judging): a folder, the alias, or a run's final/.

A run's `final/` is a full model folder, or a LoRA adapter (adapter_config.json) on the base
the run started from; an adapter is merged into its base here, so generation runs at full
speed. The tokenizer comes from the folder when it has one (runs save theirs), else the base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from prefopt.errors import PrefoptError
from prefopt.models.hub import load_tokenizer, resolve_model


def inference_device(device: str | None = None) -> torch.device:
    """`device`, else this process's own accelerator: under torchrun/accelerate each process uses
    the GPU of its local rank (a reward model or judge on GPU 0 for every rank would crowd it)."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def inference_dtype(name: str = "auto") -> torch.dtype:
    from prefopt.models.loading import resolve_dtype

    return resolve_dtype(name)


def adapter_base(folder: Path) -> str:
    """The base model of an adapter folder: its adapter_config, else the run's config.yaml next to it."""
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if base and (Path(base).exists() or not Path(base).is_absolute()):
        return base
    run_config = folder.parent / "config.yaml"
    if run_config.exists():
        import yaml

        return (yaml.safe_load(run_config.read_text()) or {}).get("model") or base
    raise PrefoptError(f"{folder}: a LoRA adapter whose base model '{base}' is not on this machine")


def is_adapter(name_or_path: str) -> bool:
    return (Path(name_or_path) / "adapter_config.json").is_file()


def model_config(name_or_path: str):
    """The transformers config of a folder, alias, or adapter's base."""
    from transformers import AutoConfig

    location = adapter_base(Path(name_or_path)) if is_adapter(name_or_path) else name_or_path
    return AutoConfig.from_pretrained(resolve_model(location))


def load_for_inference(name_or_path: str, auto_class=None, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) in eval mode on `device`; an adapter is merged into its base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    auto_class = auto_class or AutoModelForCausalLM
    kwargs = {"dtype": inference_dtype(dtype)}
    folder = Path(name_or_path)
    try:
        if is_adapter(name_or_path):
            from peft import PeftModel

            base = adapter_base(folder)
            model = auto_class.from_pretrained(resolve_model(base), **kwargs)
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
            has_tokenizer = (folder / "tokenizer_config.json").exists()
            tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else load_tokenizer(base)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        else:
            model = auto_class.from_pretrained(resolve_model(name_or_path), **kwargs)
            tokenizer = load_tokenizer(name_or_path)
    except OSError as error:
        raise PrefoptError(f"cannot load model '{name_or_path}': {str(error).splitlines()[0]}") from None
    return model.to(inference_device(device)).eval(), tokenizer
