"""Every recipe in recipes/ runs: each for a step on a tiny model, and DPO for a step on the real SmolLM2."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_model

from prefopt.config import build_config, load_yaml
from prefopt.training.run import train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_cover_the_required_losses_and_lora_variants():
    names = {p.stem for p in RECIPES}
    assert {"dpo", "dpop", "tdpo1", "tdpo2", "orpo", "kto", "dpo-lora", "dpo-qlora"} <= names
    for recipe in RECIPES:
        header = recipe.read_text().splitlines()[:3]
        assert any(f"prefopt train --config recipes/{recipe.name}" in line for line in header), recipe.name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_a_step(recipe, tmp_path, monkeypatch):
    if "qlora" in recipe.stem:
        pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(ROOT)  # recipes name data relative to the repository root
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    overrides = {
        "model": save_tiny_model(tmp_path / "tiny"),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "max_length": 96,
    }
    result = train(build_config(load_yaml(recipe), overrides))
    assert result.steps == 1 and result.metrics["loss"] > 0
    assert result.eval_after  # the recipes hold out 20% and evaluate


def test_dpo_recipe_on_the_real_model(tmp_path):
    """One step of the README's DPO recipe on SmolLM2-135M-Instruct, through the CLI."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt",
            "train",
            "--config",
            "recipes/dpo.yaml",
            "--output-dir",
            str(tmp_path / "o"),
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--max-length",
            "64",
            "--eval-fraction",
            "0.04",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prefopt: done: 1 steps" in result.stdout
    assert (tmp_path / "o" / "final" / "model.safetensors").exists()
