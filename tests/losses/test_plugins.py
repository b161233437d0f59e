"""`--loss-module FILE.py`: each file the user names is imported once, whatever its name.

The losses they register are removed after each test (tests/conftest.py)."""

from prefopt.losses import available_losses
from prefopt.plugins import import_loss_module

PLUGIN = """
from prefopt.losses import LossOutput, register_loss

@register_loss({name!r}, needs_reference=False)
def loss(inputs, *, scale: float = 1.0):
    '''A plugin loss.'''
    return LossOutput(scale * inputs.policy_chosen_logps.mean())
"""


def write_plugin(folder, loss_name: str) -> str:
    folder.mkdir()
    path = folder / "my_losses.py"
    path.write_text(PLUGIN.format(name=loss_name))
    return str(path)


def test_two_files_with_the_same_name_are_both_imported(tmp_path):
    first = write_plugin(tmp_path / "team_a", "plugin_loss_a")
    second = write_plugin(tmp_path / "team_b", "plugin_loss_b")
    import_loss_module(first)
    import_loss_module(second)  # was skipped: both were module "prefopt_user_my_losses"
    assert {"plugin_loss_a", "plugin_loss_b"} <= set(available_losses())


def test_one_file_named_twice_is_imported_once(tmp_path, monkeypatch):
    path = write_plugin(tmp_path / "team_a", "plugin_loss_once")
    import_loss_module(path)
    monkeypatch.chdir(tmp_path)
    # Importing it again would register "plugin_loss_once" a second time: LossError.
    import_loss_module("team_a/../team_a/my_losses.py")
    assert "plugin_loss_once" in available_losses()


def test_a_module_that_fails_to_import_is_one_line_naming_its_file_and_line(tmp_path, capsys):
    """A syntax error, and an exception raised while the file runs: the file, the line, the error;
    no traceback. Fixed, the same file imports (the failed attempt left nothing behind)."""
    import pytest

    from prefopt.cli.main import main
    from prefopt.errors import PrefoptError

    broken = tmp_path / "broken_loss.py"
    broken.write_text("x = 1\ndef f(:\n    pass\n")
    with pytest.raises(PrefoptError, match=r"^--loss-module .*broken_loss\.py:2: SyntaxError: "):
        import_loss_module(str(broken))
    broken.write_text("import math\n\nvalue = math.sqrt(-1)\n")
    with pytest.raises(PrefoptError, match=r"broken_loss\.py:3: ValueError: math domain error$"):
        import_loss_module(str(broken))
    assert main(["train", "--loss-module", str(broken), "--data", "x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken_loss.py:3: ValueError: math domain error" in err and "Traceback" not in err
    reward = tmp_path / "broken_reward.py"
    reward.write_text("raise RuntimeError('no model here')\n")
    from prefopt.rewards import import_reward_module

    with pytest.raises(PrefoptError, match=r"^--reward-module .*broken_reward\.py:1: RuntimeError: no model here$"):
        import_reward_module(str(reward))
    broken.write_text("value = 1\n")
    import_loss_module(str(broken))  # imports once fixed
