"""prefopt installed the way people install it (issue #23 item 7): a wheel, not an editable
checkout, in a fresh venv, used from an empty folder.

The wheel is built from a copy of the repository (no build/ left in the checkout) without build
isolation (setuptools is already in the test venv: offline). The fresh venv sees the test venv's
packages through a .pth line, which puts them after its own site-packages and does not run the
test venv's editable-install hook, so `import prefopt` there is the wheel's.
"""

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            target.symlink_to((ROOT / name).readlink())
        elif (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    dist = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("prefopt-*.whl")
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    (Path(site) / "test_venv_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    empty = work / "empty"
    empty.mkdir()
    return env_dir, empty, wheel


def run(cwd: Path, *argv) -> subprocess.CompletedProcess:
    proc = subprocess.run([*argv], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_the_wheel_carries_the_sample_data(installed):
    import zipfile

    _, _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    from prefopt.bench.samples import NAMES

    for sample in NAMES:  # every packaged sample, the feedback logs and standard pairs too
        assert f"prefopt/bench/samples/{sample}" in names
    assert not any(name.startswith(("tests/", "data_samples/")) for name in names)


def test_version_and_losses_from_an_empty_folder(installed):
    env_dir, empty, _ = installed
    where = run(empty, env_dir / "bin" / "python", "-c", "import prefopt; print(prefopt.__file__)")
    assert str(env_dir) in where.stdout, "the fresh venv imported prefopt from somewhere else"
    version = run(empty, env_dir / "bin" / "prefopt", "--version").stdout.strip()
    assert version.startswith("prefopt ")
    losses = run(empty, env_dir / "bin" / "prefopt", "losses").stdout
    assert "\ndpo\n" in "\n" + losses and "kto" in losses and "grpo" in losses


def test_the_demos_data_step_from_an_empty_folder(installed):
    """What failed: FileNotFoundError .../site-packages/data_samples/conversational.jsonl."""
    env_dir, empty, _ = installed
    code = (
        "import json; from pathlib import Path; from prefopt.bench.demo import write_data;"
        "train, held = write_data(Path('demo-data'));"
        "print(json.dumps([len(train.read_text().splitlines()), len(held.read_text().splitlines())]))"
    )
    counts = json.loads(run(empty, env_dir / "bin" / "python", "-c", code).stdout)
    assert counts == [32, 8]
    first = json.loads((empty / "demo-data" / "train.jsonl").read_text().splitlines()[0])
    assert first["chosen"][0]["content"].startswith("Answer: ")
