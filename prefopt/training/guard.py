"""What keeps a run folder honest: one process at a time, --resume only continues the same run,
a finished run stays finished, and a run that never took a step does not block the next try.

Resume rules (checked before any model is loaded):
- A run folder is *started* once it holds a checkpoint, final/, summary.json or a logged
  training step. A folder that is not started (say, the first try failed on a missing model)
  is simply started again by the same command, without --resume or --overwrite.
- --resume compares the new config with the run's config.yaml and the data with the
  fingerprint taken when the run began (size and SHA-256 of every file). Only the fields in
  MAY_CHANGE may differ: how long to train, how often to log, evaluate and save, where to
  report, and settings that change speed or memory but not the arithmetic. Anything else
  (loss, hyperparameters, model, data, token budgets, LoRA, batch size, accumulation,
  optimiser, seed, precision: dtype, mixed_precision and optimizer change the arithmetic, and
  bf16 weights' Kahan compensation lives in the optimizer state, ...) is refused with a one-line
  diff; --overwrite starts over instead.
- --resume on a finished run (final/ written, the planned steps done) says so and changes
  nothing. Raising max_steps or num_epochs continues it.
- With no checkpoint yet, --resume starts the run over with the new settings.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from prefopt.config import TrainConfig
from prefopt.errors import PrefoptError
from prefopt.training.outputs import checkpoints, is_prefopt_run, prepare_output_dir

FINGERPRINT = "data-fingerprint.json"

MAY_CHANGE = frozenset(
    {
        # how long, how often, where to
        "max_steps",
        "num_epochs",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "report_to",
        "output_dir",
        "resume",
        "overwrite",
        "skip_nonfinite",
        "mismatch_threshold",  # when to warn, not what is computed
        # speed and memory, not the arithmetic
        "chunk_size",
        "gradient_checkpointing",
        "lean_activations",
        "trim_memory",
        "share_prefix",
        "pack",
        "data_workers",
        # where code is found (the loss name and its hyperparameters are compared)
        "loss_module",
        "trust_remote_code",
    }
)
_BY_FINGERPRINT = ("data", "eval_data")  # compared by content, so moved or renamed files still resume


class RunFolderError(PrefoptError):
    pass


# -- the lock ------------------------------------------------------------------------------


class RunLock:
    """An exclusive flock on the output folder itself, held while a run writes there.

    The kernel releases it when the process exits, however it exits, so a crash never leaves
    a stale lock behind; nothing is written into the folder for it.
    """

    def __init__(self, folder: Path, fd: int | None):
        self.folder, self._fd = folder, fd

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderError(
                    f"output_dir {folder} is in use by another prefopt run; wait for it to finish or choose "
                    "another --output-dir"
                ) from None
            return cls(folder, None)  # a file system without flock: run unlocked, as before
        return cls(folder, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# -- the data fingerprint ----------------------------------------------------------------------


def fingerprint_sources(entries: list, config_name: str | None = None) -> list[dict]:
    """Each data source's contents: size and SHA-256 of a file (a folder: of its files, in name
    order), datasets' fingerprint of a hub dataset or Dataset, a digest of a list's records.
    A path that no longer exists has none (so --resume reports the difference, not a crash)."""
    from prefopt.data import DataError
    from prefopt.data.sources import parse_sources, source_fingerprint

    result = []
    for entry in entries:
        try:
            result += [source_fingerprint(source) for source in parse_sources([entry], config_name)]
        except DataError:
            result.append({"path": str(entry), "bytes": None, "sha256": None})
    return result


def data_fingerprint(config: TrainConfig) -> dict:
    return {name: fingerprint_sources(getattr(config, name), config.data_config) for name in _BY_FINGERPRINT}


def _contents(entries: list[dict]) -> list[tuple]:
    return [(entry.get("bytes"), entry.get("sha256")) for entry in entries]


# -- comparing a resumed config with the run's ------------------------------------------------


def _resolved_loss_args(loss: str, loss_args: dict) -> dict:
    from prefopt.losses import get_loss_spec

    try:
        return get_loss_spec(loss).resolve(loss_args)
    except Exception:  # an unknown loss (its module not imported): compare what was written
        return dict(loss_args or {})


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_differences(saved: dict, config: TrainConfig, folder: Path) -> list[str]:
    """`key: old -> new` for each field that must not change on resume."""
    now = config.to_dict()
    differences = []
    for name, value in now.items():
        if name in MAY_CHANGE or name in _BY_FINGERPRINT or name == "beta" or name not in saved:
            continue
        old = saved[name]
        if name == "loss_args":
            old = _resolved_loss_args(saved.get("loss", config.loss), old)
            value = _resolved_loss_args(config.loss, value)
        if name == "reward" and isinstance(old, str):  # a run from before several rewards: one name
            old = [old]
        if old != value:
            differences.append(f"{name}: {_short(old)} -> {_short(value)}")
    stored = folder / FINGERPRINT
    if stored.exists():
        before = json.loads(stored.read_text())
        after = data_fingerprint(config)
        for name in _BY_FINGERPRINT:
            if _contents(before.get(name, [])) != _contents(after[name]):
                differences.append(f"{name}: the files' contents differ from the run's ({_names(before.get(name))})")
    else:  # a run from before fingerprints: compare the paths
        for name in _BY_FINGERPRINT:
            if name in saved and list(saved[name]) != now[name]:
                differences.append(f"{name}: {_short(saved[name])} -> {_short(now[name])}")
    return differences


def _names(entries: list[dict] | None) -> str:
    return ", ".join(Path(e["path"]).name for e in entries or []) or "none"


# -- finished? ------------------------------------------------------------------------------


def _trainer_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


_TRAINING_STATE = re.compile(
    r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth|trainer_state\.json|training_args\.bin|prefopt_state\.json)$"
)


def finished_steps(saved: dict, config: TrainConfig, folder: Path) -> int | None:
    """The steps of a finished run that `config` would not extend; None if there is training left.

    Finished: the newest checkpoint (or summary.json with final/) has done the planned steps. The
    plan is `config.max_steps`, or with -1 the number of steps transformers counted for the same
    num_epochs. transformers, resumed from a checkpoint at or past the plan, would train one more step.
    """
    found = checkpoints(folder)
    state = _trainer_state(found[-1]) if found else {}
    done = int(state.get("global_step", 0))
    if (folder / "final").is_dir() and (folder / "summary.json").exists():
        try:
            done = max(done, int(json.loads((folder / "summary.json").read_text()).get("steps", 0)))
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            pass
    if config.max_steps > 0:
        planned = config.max_steps
    elif saved.get("max_steps") == -1 and saved.get("num_epochs") == config.num_epochs and state.get("max_steps"):
        planned = int(state["max_steps"])  # the same epochs: transformers' count of their steps
    else:
        return None  # the plan changed to epochs or more epochs: let training continue
    return done if done and done >= planned else None


def complete_from_checkpoint(folder: Path) -> Path:
    """final/ from the newest checkpoint (its model and tokenizer files, not the training state),
    for a run stopped after its last checkpoint and before final/ was written. Written whole."""
    checkpoint = checkpoints(folder)[-1]
    staging = folder / ".staging-final"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint, staging, ignore=lambda _, names: [n for n in names if _TRAINING_STATE.match(n)])
    shutil.rmtree(folder / "final", ignore_errors=True)
    os.replace(staging, folder / "final")
    return checkpoint


# -- the one entry point run.py calls ---------------------------------------------------------


@dataclass
class RunStart:
    """What `begin_run` found: `finished` holds the step count of a finished run (nothing to do)."""

    output_dir: Path
    lock: RunLock
    resume: bool  # continue from a checkpoint (False: a fresh start, even if --resume was given)
    finished: int | None = None
    summary: dict = field(default_factory=dict)  # a finished run's summary.json
    notes: list[str] = field(default_factory=list)  # lines to print, e.g. why nothing is done

    def release(self) -> None:
        self.lock.release()


def begin_run(config: TrainConfig, main: bool = True) -> RunStart:
    """Lock the output folder, check it is ours, then check --resume against the run there.

    On a fresh start, writes config.yaml and the data fingerprint. Raises PrefoptError (and holds
    no lock) when the run may not go ahead. With several processes, the others (`main=False`)
    make the same checks without locking or writing.
    """
    folder = Path(config.output_dir)
    if config.resume and not folder.is_dir():
        raise RunFolderError(f"--resume: {folder} has no run to continue")
    if not main:  # the same decision as the main process (_begin_locked), read-only
        unlocked = RunLock(folder, None)
        if config.resume and not config.overwrite and is_prefopt_run(folder) and _continuable(folder):
            return _check_resume(config, folder, unlocked)
        return RunStart(folder, unlocked, resume=False)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(f"output_dir {folder} is not writable: {error.strerror or error}") from None
    lock = RunLock.acquire(folder)
    try:
        return _begin_locked(config, folder, lock)
    except BaseException:
        lock.release()
        if created:
            _remove_if_empty(folder)
        raise


def _begin_locked(config: TrainConfig, folder: Path, lock: RunLock) -> RunStart:
    if config.resume and not config.overwrite and is_prefopt_run(folder):
        if _continuable(folder):
            prepare_output_dir(folder, resume=True, overwrite=False)
            start = _check_resume(config, folder, lock)
            if start.finished is None:
                _write_identity(config, folder)  # the new length or cadence is what the next --resume compares with
            elif not (folder / "final").is_dir() or not (folder / "summary.json").exists():
                _complete(start)
            return start
        # --resume with nothing to continue from (no checkpoint yet): start over with the new settings.
        prepare_output_dir(folder, resume=False, overwrite=True)
    else:  # --overwrite wins over --resume: start over
        prepare_output_dir(folder, resume=config.resume and not config.overwrite, overwrite=config.overwrite)
    _write_identity(config, folder)
    return RunStart(folder, lock, resume=False)


def _complete(start: RunStart) -> None:
    """The planned steps are done but final/ or summary.json is missing: write them from the newest checkpoint."""
    folder = start.output_dir
    checkpoint = complete_from_checkpoint(folder)
    if not (folder / "summary.json").exists():
        start.summary = {"steps": start.finished, "final_from": checkpoint.name}
        _write_atomic(folder / "summary.json", json.dumps(start.summary, indent=2))
    start.notes.append(f"final/ was missing (stopped after the last checkpoint): written from {checkpoint.name}")


def _continuable(folder: Path) -> bool:
    return bool(checkpoints(folder) or (folder / "final").exists())


def _saved_config(folder: Path) -> dict:
    path = folder / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text()) if path.exists() else {}
    except yaml.YAMLError:
        saved = {}
    return saved if isinstance(saved, dict) else {}


def _check_resume(config: TrainConfig, folder: Path, lock: RunLock) -> RunStart:
    saved = _saved_config(folder)
    differences = config_differences(saved, config, folder)
    if differences:
        raise RunFolderError(
            f"--resume: {folder} was trained with other settings: {'; '.join(differences)} (these cannot change "
            "on resume: pass --overwrite to start over, or choose a new --output-dir)"
        )
    steps = finished_steps(saved, config, folder)
    start = RunStart(folder, lock, resume=True, finished=steps)
    if steps is not None:
        try:
            start.summary = json.loads((folder / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
        start.notes.append(
            f"{folder} holds a finished run ({steps} steps); nothing to do. To train further, raise --max-steps "
            "or --num-epochs with --resume; to start over, pass --overwrite"
        )
    return start


def _write_identity(config: TrainConfig, folder: Path) -> None:
    """config.yaml (re-runnable as --config, so without resume/overwrite) and the data fingerprint.
    Each is written whole (temporary file, then rename): other processes of the run may read them."""
    saved = dataclasses.replace(config, resume=False, overwrite=False).to_dict()
    _write_atomic(folder / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
    _write_atomic(folder / FINGERPRINT, json.dumps(data_fingerprint(config), indent=1) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp{os.getpid()}")
    staging.write_text(text)
    os.replace(staging, path)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
