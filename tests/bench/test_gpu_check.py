"""`make gpu-check`'s program runs here as its dry run (tiny models on the CPU), so it is ready
before a GPU is lent; the sharded and timing sections have their own tests (tests/training/
test_sharded.py, tests/bench/)."""

import json

from prefopt.bench.gpu_check import TRAIN_CASES, main


def test_dry_run_writes_one_report(tmp_path):
    assert main(["--quick", "--only", "kernels,train", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    results = {r["name"]: r for r in report["results"]}
    assert results["fused vs full logits, float32"]["status"] == "pass"
    assert results["dpo full, reference copy"]["detail"].startswith("losses 0.6931,")  # ln 2 at step 1
    assert all(r["status"] == "pass" for r in report["results"])
    assert "| train | tdpo2 | pass |" in (tmp_path / "gpu-check.md").read_text()
    assert report["environment"]["torch"]


def test_the_gpu_matrix_covers_the_issue():
    """Full fine-tune with a reference copy, LoRA, QLoRA; dpo/tdpo2/kto/orpo/grpo/ppo; fp16."""
    losses = {case["loss"] for case in TRAIN_CASES.values()}
    assert {"dpo", "tdpo2", "kto", "orpo", "grpo", "ppo"} <= losses
    assert any(case.get("load_in_4bit") for case in TRAIN_CASES.values())
    assert any(case.get("mixed_precision") == "fp16" for case in TRAIN_CASES.values())
