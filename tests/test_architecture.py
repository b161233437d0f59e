"""The package layout holds its rules (docs/design.md, "Packages and their rules").

- Every import between prefopt's packages runs downward in LAYERS (so there are no circles).
- No private name (`_x`) is imported from another module; a private module (`_x.py`) is imported
  only from inside its own package.
- The library never imports `prefopt.bench` or `prefopt.cli` (checked statically, and by importing
  the library's entry points in a fresh interpreter).
- Tests mirror the packages: each package has a tests/<package>/ folder and each test folder is a
  package's.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "prefopt"

# Bottom to top. A unit (a top-level module or a subpackage) may import units in its own layer or below.
LAYERS = [
    {"errors", "compat", "plugins", "distributed", "paths"},  # core: errors, private APIs, user modules, votes, cache
    {"data"},  # files -> examples -> ids -> batches
    {"config"},  # TrainConfig (validates formats against data's)
    {"losses"},  # the loss registry, one file per loss, advantage estimators
    {"models"},  # loading, lean modules, precision, log-probs, sampling
    {"rewards"},  # the reward registry
    {"online"},  # rollout step and critic: per-step services for the trainer
    {"training"},  # train(): run, inputs, guard, trainer, reference, outputs, report.png
    {"evaluation"},  # prefopt eval
    {"iterative"},  # pairs, iterate (calls train)
    {"cli"},  # the command line
    {"bench"},  # programs: benchmarks, demo, experiments
    {"__init__", "__main__"},  # the lazy public API and `python -m prefopt`
]
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def unit_of(module: str) -> str:
    """'prefopt.models.logps' -> 'models'; 'prefopt' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported module, imported names, line) for every prefopt import in the file, nested ones too."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "prefopt":
                yield target, [alias.name for alias in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "prefopt":
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            raise AssertionError(f"{path}:{node.lineno}: __import__ hides an import from these checks")


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(path)) for path in SOURCES}
    assert units == set(LAYER_OF), f"units without a layer: {units - set(LAYER_OF)}; stale: {set(LAYER_OF) - units}"


def test_imports_run_downward():
    upward = []
    for path in SOURCES:
        source = unit_of(module_name(path))
        for target, names, line in imports(path):
            if target == "prefopt" and names == ["__version__"]:
                continue  # a constant of the root package, not its lazy API
            # `from prefopt import losses` names a unit, not the root package's API
            units = [unit_of(f"prefopt.{n}") for n in names] if target == "prefopt" else []
            for unit in units or [unit_of(target)]:
                if unit in LAYER_OF and unit != "__init__" and LAYER_OF[unit] > LAYER_OF[source]:
                    upward.append(f"{path.relative_to(ROOT)}:{line}: {source} imports {unit} ({target})")
                if unit == "__init__" and source != "__init__":
                    upward.append(f"{path.relative_to(ROOT)}:{line}: {source} imports the root package's lazy API")
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def is_module(dotted: str) -> bool:
    path = ROOT / Path(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_no_private_name_crosses_a_module():
    crossings = []
    for path in SOURCES:
        module = module_name(path)
        for target, names, line in imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            # `from prefopt.losses import _policy_gradient` imports the module prefopt.losses._policy_gradient
            modules = [f"{target}.{n}" for n in names if is_module(f"{target}.{n}")] or [target]
            for imported in modules:
                parts = imported.split(".")
                for i, part in enumerate(parts):
                    owner = ".".join(parts[:i])  # the package a private module belongs to
                    if part.startswith("_") and not module.startswith(owner + "."):
                        crossings.append(f"{where}: private module {imported} imported from outside {owner}")
            for name in names:
                if name.startswith("_") and not is_module(f"{target}.{name}") and name != "__version__":
                    crossings.append(f"{where}: private name {name} imported from {target}")
    assert not crossings, "\n".join(crossings)


def test_the_library_never_imports_programs_or_the_cli():
    """A fresh interpreter imports the library's entry points; no bench or cli module comes along."""
    code = (
        "import sys, prefopt.training.run, prefopt.iterative.iterate, prefopt.evaluation.evaluate, prefopt.rewards;"
        "from prefopt import train, TrainConfig;"
        "bad = sorted(m for m in sys.modules if m.startswith(('prefopt.bench', 'prefopt.cli')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_importing_losses_stays_light():
    """`import prefopt.losses` (what a user's loss file imports) loads no transformers."""
    code = "import sys, prefopt.losses; sys.exit('transformers' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


TEST_ONLY = {"__pycache__"}


def test_tests_mirror_the_packages():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    test_folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name not in TEST_ONLY}
    assert packages <= test_folders, f"packages without tests/<package>/: {sorted(packages - test_folders)}"
    assert test_folders <= packages, f"test folders that are not packages: {sorted(test_folders - packages)}"


@pytest.mark.parametrize("folder", sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()))
def test_every_test_folder_has_tests(folder):
    assert list((ROOT / "tests" / folder).glob("test_*.py")), f"tests/{folder}/ holds no test file"
