"""The notebook way in, run the way users run it: in a real Jupyter (ipykernel) kernel.

One test executes a notebook with nbclient (the README's example, `train()` twice in one kernel);
the other interrupts the kernel during `train()` as Jupyter's stop button does (SIGINT to the
kernel process), then resumes in the next cell of the same, still running kernel.
"""

from __future__ import annotations

import json
import queue
import textwrap
import time
from pathlib import Path

import pytest
from helpers import save_tiny_model

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupyter_client = pytest.importorskip("jupyter_client")

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """The kernel inherits this environment: offline, its own cache, quiet tokenizers."""
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    return save_tiny_model(tmp_path / "model")


def _code(text: str) -> str:
    return textwrap.dedent(text).strip()


def test_readme_notebook_trains_twice_in_one_kernel(tmp_path, kernel_env):
    model = kernel_env
    setup = f"""
        from prefopt import train, TrainConfig
        common = dict(model={str(model)!r}, max_steps=3, batch_size=2, learning_rate=1e-3, logging_steps=1)
        pairs = {str(SAMPLES / "standard.jsonl")!r}
    """
    first = f"""
        result = train(TrainConfig(loss="dpo", data=pairs, output_dir={str(tmp_path / "run1")!r}, **common))
        print("first", result.steps, result.metrics["loss"], result.final_dir.is_dir())
    """
    second = f"""
        import datasets
        table = datasets.Dataset.from_json(pairs)  # a Dataset object, as a notebook holds one
        result2 = train(TrainConfig(loss="ipo", data=table, output_dir={str(tmp_path / "run2")!r}, **common))
        print("second", result2.steps, result2.metrics["loss"], result2.final_dir.is_dir())
    """
    handlers = """
        import signal
        print("handlers", repr(signal.getsignal(signal.SIGINT)), repr(signal.getsignal(signal.SIGTERM)))
    """
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(_code(c)) for c in (setup, first, second, handlers)]
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [cell.outputs for cell in nb.cells]
    assert not any(out.output_type == "error" for cell in outputs for out in cell)

    def text(cell):
        return "".join(out.get("text", "") for out in outputs[cell] if out.output_type == "stream")

    def html(cell):
        return "".join(out.get("data", {}).get("text/html", "") for out in outputs[cell])

    for cell, label in ((1, "first"), (2, "second")):
        line = next(ln for ln in text(cell).splitlines() if ln.startswith(label))
        _, steps, loss, saved = line.split()
        assert steps == "3" and saved == "True" and float(loss) > 0
        assert "<progress" in html(cell)  # transformers' notebook progress bar, not tqdm text
        assert "Traceback" not in text(cell)
    assert "prefopt: train: 50 examples, token ids cached in" in text(1)
    assert "prefopt: train: 50 examples, token ids cached in" in text(2)  # another source: another entry
    assert "<in memory: a datasets.Dataset of 50 rows" in (tmp_path / "run2" / "config.yaml").read_text()
    run1 = [json.loads(x) for x in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in run1 if "loss" in m] == [1, 2, 3]
    # the kernel's own handlers are back after each run, not prefopt's StopOnSignal
    assert "handlers" in text(3) and "StopOnSignal" not in text(3)


def _collect(client, msg_id: str, timeout: float = 300) -> dict:
    """Wait for one execution to finish; return {'status', 'ename', 'stdout'}."""
    stdout, ename = [], None
    deadline = time.time() + timeout
    while True:
        try:
            msg = client.get_iopub_msg(timeout=max(1.0, deadline - time.time()))
        except queue.Empty:
            raise AssertionError(f"kernel gave no output for {timeout}s: {''.join(stdout)[-2000:]}") from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            stdout.append(content["text"])
        elif kind == "error":
            ename = content["ename"]
            stdout.append("\n".join(content["traceback"]))
        elif kind == "status" and content["execution_state"] == "idle":
            break
    while True:
        reply = client.get_shell_msg(timeout=60)
        if reply["parent_header"].get("msg_id") == msg_id:
            return {"status": reply["content"]["status"], "ename": ename, "stdout": "".join(stdout)}


def _run(client, code: str) -> dict:
    return _collect(client, client.execute(_code(code)))


def test_kernel_interrupt_saves_a_checkpoint_and_the_next_cell_resumes(tmp_path, kernel_env):
    model, out = kernel_env, tmp_path / "run"
    manager, client = jupyter_client.manager.start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        _run(
            client,
            f"""
            from prefopt import train, TrainConfig
            config = dict(model={str(model)!r}, data={str(SAMPLES / "standard.jsonl")!r}, output_dir={str(out)!r},
                          batch_size=2, learning_rate=1e-3, logging_steps=1, save_steps=100000)
            """,
        )
        # Far more steps than can finish: the interrupt arrives during training.
        msg_id = client.execute(_code("result = train(TrainConfig(max_steps=100000, **config))"))
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists():
            assert time.time() < deadline, "training never logged a step"
            time.sleep(0.1)
        time.sleep(0.5)
        manager.interrupt_kernel()  # what Jupyter's stop button does: SIGINT to the kernel process
        interrupted = _collect(client, msg_id, timeout=120)
        assert interrupted["ename"] == "KeyboardInterrupt", interrupted["stdout"][-3000:]
        assert "SIGINT received: stopped at step" in interrupted["stdout"]
        checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
        assert len(checkpoints) == 1
        stopped = int(checkpoints[0].split("-")[1])
        assert manager.is_alive()

        # The same kernel: handlers are back, and the next cell continues the run to two more steps.
        resumed = _run(
            client,
            f"""
            import signal
            assert "StopOnSignal" not in repr(signal.getsignal(signal.SIGINT))
            result = train(TrainConfig(max_steps={stopped + 2}, resume=True, **config))
            print("resumed", result.steps, result.interrupted)
            """,
        )
        assert resumed["status"] == "ok", resumed
        assert f"resumed {stopped + 2} None" in resumed["stdout"]
        logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in logs if "loss" in m] == list(range(1, stopped + 3))
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_notebook_bar_survives_a_run_stopped_at_step_two():
    """transformers' bar raises TypeError at train end when the run stops at step 2, the value the
    bar started from (seen on a kernel interrupt); prefopt's subclass shows elapsed time instead."""
    pytest.importorskip("IPython")
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.utils.notebook import NotebookProgressCallback

    from prefopt.training.callbacks import _notebook_progress_class

    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    state = TrainerState(max_steps=100, num_train_epochs=1)
    state.epoch, state.global_step = 0.01, 1

    def run(callback):
        callback.on_train_begin(args, state, TrainerControl())
        callback.on_step_end(args, state, TrainerControl())  # the bar starts at global_step + 1 = 2
        time.sleep(0.01)
        state.global_step = 2
        callback.on_step_end(args, state, TrainerControl())
        callback.on_train_end(args, state, TrainerControl())

    with pytest.raises(TypeError):  # the upstream behaviour this works around
        run(NotebookProgressCallback())
    state.global_step = 1
    run(_notebook_progress_class()())  # no error
