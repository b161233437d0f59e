"""TrainConfig precedence (defaults < YAML < flags), unknown keys, output-folder protection, the CLI and the Python API."""

import subprocess
import sys

import pytest
import yaml
from helpers import SAMPLES, read_metrics, train_argv

from prefopt import TrainConfig, train
from prefopt.cli.main import build_parser
from prefopt.config import ConfigError, build_config, load_yaml
from prefopt.errors import PrefoptError

from .test_losses_end_to_end import run


def cli_overrides(*argv) -> dict:
    args = build_parser().parse_args(["train", *argv])
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config")}
    if "loss_args" in overrides:
        overrides["loss_args"] = dict(overrides["loss_args"])
    return overrides


def test_defaults_then_yaml_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "loss": "dpop",
                "learning_rate": 2e-5,
                "batch_size": 8,
                "loss_args": {"beta": 0.3, "dpop_lambda": 10.0},
                "lora": True,
            }
        )
    )
    config = build_config(
        load_yaml(recipe),
        cli_overrides("--batch-size", "2", "--loss-arg", "dpop_lambda=5", "--no-lora", "--data", "a.jsonl", "b.jsonl"),
    )
    assert config.loss == "dpop"  # YAML over default
    assert config.learning_rate == 2e-5  # YAML, no flag
    assert config.batch_size == 2  # flag over YAML
    assert config.loss_args == {"beta": 0.3, "dpop_lambda": 5}  # merged key by key
    assert config.lora is False
    assert config.data == ["a.jsonl", "b.jsonl"]
    assert config.max_length == TrainConfig().max_length  # default
    assert build_config({}, cli_overrides("--beta", "0.5")).loss_args == {"beta": 0.5}


def test_unknown_yaml_key_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss: dpo\nlearning_rte: 0.1\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'learning_rte'; did you mean 'learning_rate'\?"):
        load_yaml(recipe)


def test_unknown_flag_exits_with_usage():
    result = subprocess.run(
        [sys.executable, "-m", "prefopt", "train", "--learning-rte", "1"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "prefopt train: error: unknown flag --learning-rte; did you mean --learning-rate or --value-learning-rate or --logging-steps?"
    )


def test_bad_loss_argument_is_a_clean_cli_error(tmp_path, tiny_model_dir):
    argv = train_argv(tiny_model_dir, tmp_path / "o", "standard.jsonl", "--loss-arg", "gamma=1")
    result = subprocess.run([sys.executable, "-m", "prefopt", *argv], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "loss 'dpo' has no hyperparameter 'gamma'; valid ones: beta, label_smoothing" in result.stderr
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_output_dir_protection(tmp_path, tiny_model_dir):
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("precious")
    with pytest.raises(PrefoptError, match="not empty and is not a prefopt run"):
        run(tmp_path, tiny_model_dir, output_dir=str(user_dir), max_steps=1)
    # --overwrite writes next to the user's files and keeps them
    run(tmp_path, tiny_model_dir, output_dir=str(user_dir), max_steps=1, overwrite=True)
    assert (user_dir / "notes.txt").read_text() == "precious" and (user_dir / "final").is_dir()
    # an existing run needs --resume or --overwrite
    with pytest.raises(PrefoptError, match="holds an earlier run: pass --resume .* or --overwrite"):
        run(tmp_path, tiny_model_dir, output_dir=str(user_dir), max_steps=1)
    run(tmp_path, tiny_model_dir, output_dir=str(user_dir), max_steps=1, overwrite=True)
    assert (user_dir / "notes.txt").read_text() == "precious"
    # a user's file with one of our names is never replaced
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "config.yaml").write_text("mine: true\n")
    with pytest.raises(PrefoptError, match="has your own config.yaml"):
        run(tmp_path, tiny_model_dir, output_dir=str(clash), max_steps=1, overwrite=True)
    assert (clash / "config.yaml").read_text() == "mine: true\n"


def test_run_outputs_and_rerunnable_config(tmp_path, tiny_model_dir):
    result = run(tmp_path, tiny_model_dir, loss="dpo", max_steps=2, save_steps=1, eval_fraction=0.2)
    out = result.output_dir
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    assert not (result.final_dir / "training_args.bin").exists()
    saved = load_yaml(out / "config.yaml")
    assert saved["loss"] == "dpo" and saved["max_steps"] == 2
    logs = read_metrics(out)
    assert any("eval_before_loss" in m for m in logs) and any("eval_loss" in m for m in logs)
    assert result.eval_before["eval_before_rewards/accuracies"] == 0.0  # policy == reference: ties
    assert set(result.eval_after) >= {"eval_loss", "eval_rewards/margins", "eval_policy/prefers_chosen"}
    # the saved config re-runs as --config (into a new folder)
    again = build_config(load_yaml(out / "config.yaml"), {"output_dir": str(tmp_path / "again")})
    assert again.loss_args == TrainConfig(**saved).loss_args


def test_python_api_from_a_notebook(tmp_path, tiny_model_dir):
    config = TrainConfig(
        loss="orpo",
        model=tiny_model_dir,
        data=str(SAMPLES / "standard.jsonl"),
        output_dir=str(tmp_path / "nb"),
        max_steps=2,
        batch_size=2,
        learning_rate=1e-3,
    )
    result = train(config)
    assert result.steps == 2 and result.final_dir.is_dir()
    assert "nll" in result.metrics and result.metrics["loss"] > 0


def test_cli_train_end_to_end(tmp_path, tiny_model_dir):
    argv = train_argv(
        tiny_model_dir,
        tmp_path / "cli",
        "conversational.jsonl",
        "--loss",
        "tdpo1",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--logging-steps",
        "1",
        "--max-length",
        "96",
        "--beta",
        "0.2",
    )
    result = subprocess.run([sys.executable, "-m", "prefopt", *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prefopt: done: 2 steps" in result.stdout
    logs = [m for m in read_metrics(tmp_path / "cli") if "loss" in m]
    assert len(logs) == 2 and "kl/chosen" in logs[0]


def test_a_data_error_leaves_no_output_folder_behind(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(PrefoptError, match="bad.jsonl:2: missing field 'rejected'"):
        run(tmp_path, tiny_model_dir, data=[str(bad)], output_dir=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_an_evaluation_scheduled_at_the_last_step_is_not_repeated(tmp_path, tiny_model_dir, capsys):
    """--eval-steps 2 in a 4-step run: evaluations at steps 2 and 4, and the one at step 4 is the
    "after training" result (no second pass over the same weights, one console line)."""
    result = run(tmp_path, tiny_model_dir, loss="dpo", max_steps=4, eval_steps=2, eval_fraction=0.2)
    evals = [m["step"] for m in read_metrics(result.output_dir) if "eval_loss" in m]
    assert evals == [2, 4]
    assert result.eval_after["eval_loss"] == next(
        m["eval_loss"] for m in read_metrics(result.output_dir) if m.get("step") == 4 and "eval_loss" in m
    )
    assert capsys.readouterr().out.count("eval @ step 4") == 1


def test_metrics_stay_on_the_device_until_a_step_is_logged():
    """A loss's metrics are kept as detached 0-d tensors over the logging window (no device wait per
    metric and micro-batch) and averaged in one copy when logged: (1 + 2 + 6) / 3 = 3, (0.5 + 1) / 2."""
    import torch

    from prefopt.training.trainer import _detached, window_means

    loss = torch.tensor(2.0, requires_grad=True)
    kept = _detached({"a": loss * 3, "b": 0.5})
    assert torch.is_tensor(kept["a"]) and not kept["a"].requires_grad and kept["b"] == 0.5
    means = window_means({"a": [torch.tensor(1.0), torch.tensor(2.0), kept["a"]], "b": [kept["b"], 1.0], "c": []})
    assert means == {"a": 3.0, "b": 0.75} and all(type(v) is float for v in means.values())
