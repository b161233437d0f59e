"""`prefopt sample` survives a kill: batches by length, appended as they finish, `--resume` gives the
uninterrupted file byte for byte; a cut line, a changed flag and a left-over job are handled."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import byte_tokenizer, save_tiny_model, tiny_llama

from prefopt.cli.main import main
from prefopt.data.formats import PromptExample
from prefopt.errors import PrefoptError
from prefopt.iterative.sample_job import progress_path, run_sample_job
from prefopt.models.rollout import SampleSettings, batch_plan, sample_prompts


def test_batch_plan_by_hand():
    """Lengths 3, 5, 1, 5, 2 in batches of 2: longest first, equal lengths in input order:
    [1, 3] (5, 5), [0, 4] (3, 2), [2] (1)."""
    rows = [[0] * n for n in (3, 5, 1, 5, 2)]
    assert batch_plan(rows, 2) == [[1, 3], [0, 4], [2]]


def test_batched_by_length_greedy_answers_do_not_depend_on_the_batching():
    """Greedy decoding is per row, so batches of similar length give each prompt what it gets alone."""
    model, tok = tiny_llama(0), byte_tokenizer()
    prompts = ["a", "a much longer prompt than the others", "mid length", "b", "another long-ish prompt"]
    settings = dict(num_samples=2, max_new_tokens=6, temperature=0)
    together = sample_prompts(model, tok, prompts, SampleSettings(**settings, batch_size=2))
    alone = sample_prompts(model, tok, prompts, SampleSettings(**settings, batch_size=1))
    assert [g.completion_ids for g in together] == [g.completion_ids for g in alone]


def _prompts(n=7):
    return [PromptExample(f"question {i} " + "x" * (i % 4), {"answer": str(i)}, f"p:{i}") for i in range(n)]


class Stop(Exception):
    pass


def test_a_stopped_job_resumes_to_the_uninterrupted_file(tmp_path):
    """7 prompts in batches of 2 (4 batches), sampled at T = 1. Stopped after batch 1 is on disk,
    the progress file holds the header and 2 prompts; a half-written line is appended as a kill
    would leave it. --resume keeps batch 0, drops the cut line, samples batches 1-3 (under their
    own seeds) and writes the same bytes as a job never stopped; the progress file is gone."""
    model, tok = tiny_llama(1), byte_tokenizer()
    settings = SampleSettings(num_samples=3, max_new_tokens=8, temperature=1.0, batch_size=2, seed=5)
    whole = tmp_path / "whole.jsonl"
    run_sample_job(model, tok, "tiny", _prompts(), settings, None, whole)
    assert not progress_path(whole).exists()

    out = tmp_path / "out.jsonl"

    def stop(k):
        if k == 0:
            raise Stop

    with pytest.raises(Stop):
        run_sample_job(model, tok, "tiny", _prompts(), settings, None, out, on_batch=stop)
    progress = progress_path(out)
    assert not out.exists() and len(progress.read_text().splitlines()) == 1 + 2
    with open(progress, "a") as f:
        f.write('{"batch": 1, "index": 0, "rec')  # cut by the kill
    with pytest.raises(PrefoptError, match=r"a stopped sampling job left .*pass --resume"):
        run_sample_job(model, tok, "tiny", _prompts(), settings, None, out)
    changed = SampleSettings(num_samples=3, max_new_tokens=8, temperature=0.7, batch_size=2, seed=5)
    with pytest.raises(PrefoptError, match=r"the stopped job differs \(temperature 1.0 -> 0.7\)"):
        run_sample_job(model, tok, "tiny", _prompts(), changed, None, out, resume=True)
    job = run_sample_job(model, tok, "tiny", _prompts(), settings, None, out, resume=True)
    assert job["resumed"] == 2 and job["stats"].prompts == 5
    assert out.read_bytes() == whole.read_bytes() and not progress.exists()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == [str(i) for i in range(7)]  # input order


def test_sigkill_mid_run_then_resume_from_the_command_line(tmp_path, capsys):
    """A real kill: `prefopt sample` in its own process is SIGKILLed once its progress file holds a
    batch; `--resume` finishes it, and the file equals an uninterrupted run's, byte for byte."""
    model = save_tiny_model(tmp_path / "m")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Q{i}: " + "y" * (i % 5)}) + "\n" for i in range(40)))
    common = ["sample", "--model", model, "--prompts", str(prompts), "--num-samples", "2"]
    common += ["--max-new-tokens", "48", "--batch-size", "1", "--temperature", "1.0", "--seed", "3"]
    whole, out = tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    assert main([*common, "--output", str(whole)]) == 0
    progress = progress_path(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-m", "prefopt", *common, "--output", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if progress.exists() and len(progress.read_text().splitlines()) >= 3:  # the header and two batches
            break
        time.sleep(0.02)
    assert child.poll() is None, "the job ended before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    kept = len(progress.read_text().splitlines()) - 1
    assert not out.exists() and 2 <= kept < 40
    capsys.readouterr()
    assert main([*common, "--output", str(out)]) == 2
    assert "a stopped sampling job left" in capsys.readouterr().err
    assert main([*common, "--output", str(out), "--resume"]) == 0
    assert "prompts kept from the stopped job" in capsys.readouterr().out
    assert out.read_bytes() == whole.read_bytes() and not progress.exists()
