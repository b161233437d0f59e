"""The online tests' tiny setup: four prompts, a digit-share reward module and a saved tiny Llama."""

import json

import pytest
from helpers import save_tiny_model

REWARD_MODULE = '''
from prefopt.rewards import register_reward


@register_reward("test_digits", replace=True)
def digits(prompts, completions, **columns):
    """Share of the completion's characters that are digits: about 4% for a random byte model."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]
'''
PROMPTS = ["Count: ", "Numbers please: ", "Write a code: ", "PIN? "]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    (root / "digits_reward.py").write_text(REWARD_MODULE)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root, save_tiny_model(root / "model")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
