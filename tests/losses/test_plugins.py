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
