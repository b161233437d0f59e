"""The command line fits TRL/transformers habits (issue #23 item 8): no silent abbreviations,
underscore spellings, one line naming the flag an unknown one probably is, `--version`."""

import re
from pathlib import Path

import pytest

from prefopt.cli.main import build_parser, main
from prefopt.config import ConfigError, build_config, load_yaml

ROOT = Path(__file__).resolve().parents[2]


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_underscore_spellings_are_the_same_flags():
    args = build_parser().parse_args(
        ["train", "--learning_rate", "1e-5", "--batch_size=2", "--max_prompt_length", "64", "--no_share_prefix"]
    )
    assert (args.learning_rate, args.batch_size, args.max_prompt_length, args.share_prefix) == (1e-5, 2, 64, False)
    hyphens = build_parser().parse_args(["train", "--learning-rate", "1e-5", "--batch-size=2"])
    assert (hyphens.learning_rate, hyphens.batch_size) == (1e-5, 2)


def test_an_abbreviation_is_not_silently_another_flag(capsys):
    """`--lr` used to be taken as `--lr-scheduler` ("must be one of linear, cosine, ...")."""
    line = error_of(["train", "--lr", "1e-5"], capsys)
    assert line == "prefopt train: error: unknown flag --lr: prefopt calls it --learning-rate"
    assert "scheduler" not in line
    assert error_of(["data", "inspect", "f.jsonl", "--max-len", "9"], capsys).startswith(
        "prefopt data inspect: error: unknown flag --max-len; did you mean --max-length"
    )


@pytest.mark.parametrize(
    ("typed", "prefopt_flag"),
    [
        ("--per_device_train_batch_size", "--batch-size"),
        ("--gradient-accumulation-steps", "--grad-accum"),
        ("--num_train_epochs", "--num-epochs"),
        ("--model_name_or_path", "--model"),
        ("--lr_scheduler_type", "--lr-scheduler"),
    ],
)
def test_a_trl_name_is_answered_with_prefopts_flag(typed, prefopt_flag, capsys):
    line = error_of(["train", typed, "2"], capsys)
    assert line == f"prefopt train: error: unknown flag {typed}: prefopt calls it {prefopt_flag}"


def test_an_unknown_flag_gets_the_closest_ones(capsys):
    assert error_of(["train", "--learning-rat", "1e-5"], capsys) == (
        "prefopt train: error: unknown flag --learning-rat; did you mean --learning-rate or --value-learning-rate?"
    )
    assert error_of(["sample", "--prompts", "p", "--output", "o", "--tempreature", "0"], capsys).endswith(
        "unknown flag --tempreature; did you mean --temperature?"
    )
    assert error_of(["train", "stray"], capsys) == "prefopt train: error: unexpected argument 'stray'"


def test_yaml_keys_with_trl_names_say_prefopts_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("per_device_train_batch_size: 2\n")
    with pytest.raises(
        ConfigError, match=r"r.yaml: unknown key 'per_device_train_batch_size'; prefopt calls it 'batch_size'"
    ):
        build_config(load_yaml(recipe))


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert capsys.readouterr().out.strip() == f"prefopt {version}"
