import json
from pathlib import Path

import pytest
from helpers import save_tiny_model

SAMPLES = Path(__file__).resolve().parents[2] / "data_samples"


def train_argv(model_dir, output_dir, data: str = "standard.jsonl", *extra) -> list[str]:
    """`prefopt train ...` arguments for a run on a sample file."""
    return ["train", "--model", str(model_dir), "--data", str(SAMPLES / data), "--output-dir", str(output_dir), *extra]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own reference cache folder."""
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))


def read_metrics(output_dir) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
