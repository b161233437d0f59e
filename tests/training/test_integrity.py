"""Config and resume integrity: typed config values, --resume only continues the same run, a finished
run stays finished, a failed start does not block the fixed command, one process per output folder."""

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SAMPLES, byte_tokenizer, read_metrics, tiny_llama, train_argv
from transformers import LlamaForCausalLM

from prefopt.cli.main import main
from prefopt.config import ConfigError, TrainConfig, build_config, load_yaml
from prefopt.errors import PrefoptError
from prefopt.models.quiet_logs import TiedKeysFilter
from prefopt.training.guard import RunFolderError, RunLock
from prefopt.training.outputs import MARKER, prepare_output_dir

FAST = ("--batch-size", "2", "--logging-steps", "1", "--max-length", "96", "--learning-rate", "1e-3")


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under metrics.jsonl and final/, by relative path, with its bytes."""
    files = [folder / "metrics.jsonl", *sorted((folder / "final").rglob("*"))]
    return {str(p.relative_to(folder)): p.read_bytes() for p in files if p.is_file()}


# -- 1. typed config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "flags", "message"),
    [
        ("learning_rate: fast\n", (), "{recipe}: learning_rate: expected a number, got 'fast'"),
        ("warmup_ratio: [1]\n", (), "{recipe}: warmup_ratio: expected a number, got [1]"),
        ("max_steps: many\n", (), "{recipe}: max_steps: expected an integer, got 'many'"),
        ("", ("--learning-rate", "-1"), "--learning-rate: must be > 0, got -1.0"),
    ],
)
def test_bad_values_are_one_line_errors_naming_key_and_source(tmp_path, capsys, recipe, flags, message):
    (tmp_path / "r.yaml").write_text(recipe + "max_length: 96\n")
    argv = train_argv("unused-model", tmp_path / "out", "standard.jsonl", "--config", str(tmp_path / "r.yaml"), *flags)
    code, out, err = cli(capsys, *argv)
    assert code == 2
    assert err == f"prefopt: error: {message.format(recipe=tmp_path / 'r.yaml')}\n"  # one line, no traceback
    assert not (tmp_path / "out").exists()  # refused before the folder is touched


def test_every_field_is_checked_against_its_type_and_range(tmp_path):
    config = TrainConfig(learning_rate=1, num_epochs=2, warmup_ratio="1e-1", data=tmp_path / "a.jsonl")
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)  # an int is a number
    assert config.num_epochs == 2.0 and config.warmup_ratio == 0.1  # YAML 1.1 reads 1e-1 as text
    assert config.data == [str(tmp_path / "a.jsonl")]
    assert TrainConfig(output_dir=tmp_path).output_dir == str(tmp_path)
    bad = {
        "batch_size": (True, "batch_size: expected an integer, got True"),  # a bool is not an int
        "max_steps": (0, "max_steps: must be -1 (run num_epochs) or >= 1, got 0"),
        "warmup_ratio": (1.5, "warmup_ratio: must be between 0 and 1, got 1.5"),
        "eval_fraction": (1, "eval_fraction: must be >= 0 and < 1, got 1.0"),
        "num_epochs": (0, "num_epochs: must be > 0, got 0.0"),
        "learning_rate": (float("nan"), "learning_rate: expected a finite number, got nan"),
        "lora": ("yes", "lora: expected true or false, got 'yes'"),
        "eval_steps": ("10", "eval_steps: expected an integer or null, got '10'"),
        "lr_scheduler": ("cosinus", "lr_scheduler: must be one of linear, cosine, "),
        "dtype": ("fp8", "dtype: must be one of auto, float32, bfloat16, float16, got 'fp8'"),
        "data": (
            [1],
            "data: expected files, hub dataset ids, mixture entries {path, weight, max_samples}, "
            "Datasets or a list of records; entry 0 is a int, got [1]",
        ),
        "loss_args": ([0.1], "loss_args: expected a mapping of NAME: VALUE, got [0.1]"),
        "seed": (-1, "seed: must be between 0 and 2**32 - 1, got -1"),
    }
    for name, (value, message) in bad.items():
        with pytest.raises(ConfigError) as caught:
            TrainConfig(**{name: value})
        assert str(caught.value).startswith(message), name
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss_args: [1]\nlora_r: 8\n")
    with pytest.raises(ConfigError, match=r"r.yaml: loss_args: expected a mapping"):
        build_config(load_yaml(recipe))
    recipe.write_text("lora_r: 0\n")
    with pytest.raises(ConfigError, match=r"^--lora-r: must be >= 1, got 0$"):
        build_config(load_yaml(recipe), {"lora_r": 0})  # the flag wins, so the flag is named
    with pytest.raises(ConfigError, match=r"r.yaml: lora_r: must be >= 1, got 0$"):
        build_config(load_yaml(recipe), {"lora_alpha": 8})


# -- 2. and 3. resume: a finished run stays finished; only the same run continues -------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    """A 4-step DPO run (checkpoints 2 and 4) on a copy of the standard samples; copy it before changing it."""
    root = tmp_path_factory.mktemp("finished")
    shutil.copy(SAMPLES / "standard.jsonl", root / "pairs.jsonl")
    argv = [*base_argv(tiny_model_dir, root / "run", root / "pairs.jsonl"), "--max-steps", "4"]
    assert main(argv) == 0
    return root


def base_argv(model_dir, output_dir, data) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output-dir",
        str(output_dir),
        "--save-steps",
        "2",
        *FAST,
    ]


def copy_run(finished_run, tmp_path) -> tuple[Path, Path]:
    shutil.copytree(finished_run, tmp_path / "copy")
    return tmp_path / "copy" / "run", tmp_path / "copy" / "pairs.jsonl"


def test_resuming_a_finished_run_changes_nothing_until_max_steps_is_raised(
    finished_run, tmp_path, tiny_model_dir, capsys
):
    out, data = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    code, stdout, _ = cli(capsys, *base_argv(tiny_model_dir, out, data), "--max-steps", "4", "--resume")
    assert code == 0
    assert f"{out} holds a finished run (4 steps); nothing to do" in stdout
    assert snapshot(out) == before  # metrics.jsonl and final/ byte-identical
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # more steps (and a different logging cadence) may be asked for: training continues from step 4
    code, stdout, _ = cli(
        capsys, *base_argv(tiny_model_dir, out, data), "--max-steps", "6", "--resume", "--save-steps", "3"
    )
    assert code == 0 and "resuming from" in stdout and "done: 6 steps" in stdout
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert load_yaml(out / "config.yaml")["max_steps"] == 6  # the next --resume compares with the new plan
    assert load_yaml(out / "config.yaml")["resume"] is False  # still re-runnable as --config elsewhere


def test_resuming_a_run_stopped_before_final_writes_final_from_its_last_checkpoint(
    finished_run, tmp_path, tiny_model_dir, capsys
):
    out, data = copy_run(finished_run, tmp_path)
    shutil.rmtree(out / "final")  # killed after checkpoint-4 was saved, before final/ was written
    (out / "summary.json").unlink()
    metrics = (out / "metrics.jsonl").read_bytes()
    code, stdout, _ = cli(capsys, *base_argv(tiny_model_dir, out, data), "--max-steps", "4", "--resume")
    assert code == 0 and "holds a finished run (4 steps)" in stdout and "written from checkpoint-4" in stdout
    assert (out / "metrics.jsonl").read_bytes() == metrics and not (out / "checkpoint-5").exists()
    weights = (out / "final" / "model.safetensors").read_bytes()
    assert weights == (out / "checkpoint-4" / "model.safetensors").read_bytes()
    assert not (out / "final" / "optimizer.pt").exists() and (out / "final" / "tokenizer.json").exists()
    assert main([*base_argv(tiny_model_dir, out, data), "--max-steps", "4", "--resume"]) == 0  # still finished
    assert (out / "final" / "model.safetensors").read_bytes() == weights


def test_resume_refuses_a_different_run_with_a_one_line_diff(finished_run, tmp_path, tiny_model_dir, capsys):
    out, data = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    resume = [*base_argv(tiny_model_dir, out, data), "--max-steps", "6", "--resume"]
    code, _, err = cli(capsys, *resume, "--loss", "ipo")
    assert code == 2 and err.count("\n") == 1
    assert "was trained with other settings: loss: 'dpo' -> 'ipo'" in err and "--overwrite" in err
    code, _, err = cli(capsys, *resume, "--batch-size", "4", "--beta", "0.2")
    assert code == 2
    assert "loss_args: {'beta': 0.1, 'label_smoothing': 0.0} -> {'beta': 0.2, 'label_smoothing': 0.0}" in err
    assert "batch_size: 2 -> 4" in err
    data.write_text(data.read_text().replace("Paris", "Lyon"))  # same file name, other contents
    code, _, err = cli(capsys, *resume)
    assert code == 2 and "data: the files' contents differ from the run's (pairs.jsonl)" in err
    assert snapshot(out) == before and not (out / "checkpoint-5").exists()
    # the defaults, written out, are not a change; moved data with the same contents is the same data
    moved = tmp_path / "moved.jsonl"
    shutil.copy(SAMPLES / "standard.jsonl", moved)
    code, stdout, err = cli(
        capsys, *base_argv(tiny_model_dir, out, moved), "--max-steps", "4", "--resume", "--beta", "0.1"
    )
    assert code == 0 and "finished run" in stdout, err
    # --overwrite starts over with the new settings
    code, stdout, _ = cli(capsys, *resume, "--loss", "ipo", "--overwrite", "--max-steps", "2")
    assert code == 0 and load_yaml(out / "config.yaml")["loss"] == "ipo"
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2]


# -- 4. a failed start does not block the fixed command ------------------------------------------


def test_a_failed_start_then_the_fixed_command_succeeds_without_overwrite(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    # no example fits max_length: found after the folder is claimed (the tokenizer is needed to know)
    argv = train_argv(tiny_model_dir, out, "standard.jsonl", "--max-steps", "1", *FAST)
    code, _, err = cli(capsys, *argv, "--max-length", "3")
    assert code == 2 and "no example fits max_length=3" in err
    assert (out / MARKER).exists() and (out / "config.yaml").exists()
    # a missing model: the same
    code, _, err = cli(capsys, *train_argv(tmp_path / "no-model", out, "standard.jsonl", "--max-steps", "1", *FAST))
    assert code == 2 and "cannot load a tokenizer" in err
    code, stdout, err = cli(capsys, *argv)  # the fixed command, as it was
    assert code == 0, err
    assert "done: 1 steps" in stdout and load_yaml(out / "config.yaml")["max_length"] == 96
    # now the run has started: the same command needs --resume or --overwrite
    code, _, err = cli(capsys, *argv)
    assert code == 2 and "holds an earlier run: pass --resume" in err


def test_a_folder_with_no_checkpoint_and_no_logged_step_is_not_started(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text("")
    (run / "config.yaml").write_text("loss: dpo\n")
    (run / "metrics.jsonl").write_text('{"step": 0, "eval_before_loss": 0.69}\n')  # eval before training only
    prepare_output_dir(run, resume=False, overwrite=False)
    assert sorted(p.name for p in run.iterdir()) == [MARKER]
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    with pytest.raises(PrefoptError, match="holds an earlier run"):
        prepare_output_dir(run, resume=False, overwrite=False)


def test_overwrite_removes_a_left_over_staging_folder(tmp_path):
    run = tmp_path / "run"
    (run / ".staging" / "checkpoint-3").mkdir(parents=True)  # a kill during a checkpoint save
    (run / "checkpoint-2").mkdir()
    (run / MARKER).write_text("")
    (run / "notes.txt").write_text("mine")
    prepare_output_dir(run, resume=False, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [MARKER, "notes.txt"]


# -- 5. no warning about tied weights on resume ---------------------------------------------------


def tied_model(folder: Path) -> Path:
    """The tiny Llama with its output head tied to the input embeddings (as SmolLM2's is)."""
    config = tiny_llama().config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def test_resume_with_tied_embeddings_does_not_warn_about_lm_head(tmp_path, capfd):
    model = tied_model(tmp_path / "tied")
    argv = [*base_argv(model, tmp_path / "out", SAMPLES / "standard.jsonl"), "--max-steps"]
    assert main([*argv, "2"]) == 0
    capfd.readouterr()
    assert main([*argv, "3", "--resume"]) == 0
    out, err = capfd.readouterr()
    assert "resuming from" in out and "done: 3 steps" in out
    assert "missing keys" not in err
    # the filter only drops the warning when every missing key is tied to another parameter
    quiet = TiedKeysFilter(LlamaForCausalLM.from_pretrained(model))
    tied = logging.LogRecord(
        "transformers.trainer", logging.WARNING, "", 0, f"{quiet.PREFIX} ['lm_head.weight'].", None, None
    )
    untied = logging.LogRecord(
        "transformers.trainer", logging.WARNING, "", 0, f"{quiet.PREFIX} ['model.norm.weight'].", None, None
    )
    assert quiet.filter(tied) is False and quiet.filter(untied) is True


# -- 6. one process per output folder ----------------------------------------------------------


def test_two_processes_started_together_one_trains_the_other_is_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "shared"
    argv = [
        sys.executable,
        "-m",
        "prefopt",
        *train_argv(tiny_model_dir, out, "standard.jsonl", "--max-steps", "12", *FAST),
    ]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [err[-1500:] for _, _, err in results]
    loser = next(err for code, _, err in results if code == 2)
    assert f"output_dir {out} is in use by another prefopt run" in loser
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, 13))  # one run's log, whole


def test_the_lock_is_released_on_exit_and_after_a_crash(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from prefopt.training.guard import RunLock; "
            f"lock = RunLock.acquire(__import__('pathlib').Path({str(folder)!r})); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunFolderError, match="in use by another prefopt run"):
        RunLock.acquire(folder)
    os.kill(holder.pid, signal.SIGKILL)  # a crash: no cleanup code runs
    holder.wait()
    with RunLock.acquire(folder) as lock:  # the kernel dropped the lock with the process
        assert lock.held
    with RunLock.acquire(folder) as again:  # released by the with-block: the same process takes it again
        assert again.held
