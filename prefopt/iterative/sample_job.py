"""`prefopt sample` as a job that survives a kill: batches appended as they finish, `--resume`.

The prompts are sampled in batches of similar lengths (`rollout.batch_plan`; batch k under
seed + k). Each finished batch is scored and appended, in one write followed by fsync, to a
progress file beside the output, `.OUTPUT.partial`, whose first line records what the job is
(the model, the prompts' digest, the sampling settings, the reward). A kill loses at most the
batch in flight. `--resume` reads the progress file back; a line cut by the kill and any batch
not complete are dropped and sampled again, and every other batch is kept as it was. Because
each batch has its own seed, the resumed job writes the same file an uninterrupted one would.
When the last batch is in, the output is written in input order, atomically, and the progress
file is removed: the output never holds a cut line or a half-finished job.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from prefopt.errors import PrefoptError


def progress_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.partial")


def job_header(model: str, prompts: list, settings, reward) -> dict:
    """What must match for a stopped job to be continued (the prompts by content)."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps([prompt.prompt, prompt.columns], sort_keys=True, ensure_ascii=False).encode())
    return {
        "model": model,
        "prompts": len(prompts),
        "prompts_sha256": digest.hexdigest(),
        "settings": asdict(settings),
        "reward": None if reward is None else {"name": reward.name, "arguments": reward.arguments},
    }


def _differences(saved: dict, wanted: dict) -> list[str]:
    out = []
    for key in wanted:
        if key == "settings":
            out += [
                f"{name} {saved[key].get(name)!r} -> {value!r}"
                for name, value in wanted[key].items()
                if saved[key].get(name) != value
            ]
        elif saved.get(key) != wanted[key]:
            out.append(
                "the prompts' contents" if key == "prompts_sha256" else f"{key} {saved.get(key)!r} -> {wanted[key]!r}"
            )
    return out


def read_progress(path: Path, header: dict, plan: list[list[int]]) -> dict[int, dict]:
    """The records of the complete batches of a stopped job (prompt index -> record).

    A cut last line and incomplete batches are dropped, and the file is rewritten with only what
    is kept, so appending continues after a whole line."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # the kill cut this line: its batch is sampled again
    lines = [line for line in lines if line]
    try:
        saved = json.loads(lines[0])["job"]
    except (IndexError, ValueError, KeyError, TypeError):
        raise PrefoptError(
            f"{path}: not a prefopt sampling job's progress file; remove it or pass --overwrite"
        ) from None
    changed = _differences(saved, header)
    if changed:
        raise PrefoptError(
            f"{path}: the stopped job differs ({', '.join(changed[:3])}); resume with the same "
            "--model, prompts and flags, or pass --overwrite to start again"
        )
    by_batch: dict[int, dict[int, dict]] = {}
    for line in lines[1:]:
        entry = json.loads(line)
        by_batch.setdefault(entry["batch"], {})[entry["index"]] = entry["record"]
    done = {k: records for k, records in by_batch.items() if k < len(plan) and set(records) == set(plan[k])}
    _rewrite(path, lines[0], done)
    return {i: record for records in done.values() for i, record in records.items()}


def _rewrite(path: Path, header_line: str, done: dict[int, dict[int, dict]]) -> None:
    staging = path.with_name(path.name + ".tmp")
    with open(staging, "w", encoding="utf-8") as f:
        f.write(header_line + "\n")
        for k in sorted(done):
            f.write("".join(_line(k, i, r) for i, r in done[k].items()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


def _line(batch: int, index: int, record: dict) -> str:
    return json.dumps({"batch": batch, "index": index, "record": record}, ensure_ascii=False) + "\n"


def _add_components(records: list[dict], components: dict[str, list]) -> None:
    """Several rewards: each one's scores beside their sum, as `rewards/NAME` (the flat scores split per prompt)."""
    for name, scores in components.items():
        at = 0
        for record in records:
            n = len(record["completions"])
            record[f"rewards/{name}"] = scores[at : at + n]
            at += n


def run_sample_job(
    model, tokenizer, model_name: str, prompts: list, settings, reward, output, resume: bool = False,
    overwrite: bool = False, on_batch=None,
) -> dict:  # fmt: skip
    """Sample, score and write `output`; returns counts for the closing line (see the module's docstring).

    `on_batch(k)` is called after batch k is on disk (the tests stop a job there)."""
    from tqdm.auto import tqdm

    from prefopt.models.rollout import (
        SampleStats,
        batch_plan,
        prompt_rows,
        sample_batch,
        sample_records,
        score_samples,
        write_jsonl,
    )

    output = Path(output)
    progress = progress_path(output)
    if output.exists() and not overwrite:
        raise PrefoptError(f"{output} exists; choose another --output or pass --overwrite")
    rows = prompt_rows(tokenizer, prompts, settings)
    plan = batch_plan(rows, settings.batch_size)
    header = job_header(model_name, prompts, settings, reward)
    done: dict[int, dict] = {}
    if progress.exists() and resume:
        done = read_progress(progress, header, plan)
    elif progress.exists() and not overwrite:
        raise PrefoptError(
            f"{output}: a stopped sampling job left {progress}: pass --resume to continue it, "
            "or --overwrite to start again"
        )
    elif resume:
        print(f"prefopt: nothing to resume ({progress} does not exist): sampling from the start")
    if not done:
        progress.parent.mkdir(parents=True, exist_ok=True)
        _rewrite(progress, json.dumps({"job": header}, ensure_ascii=False), {})
    stats = SampleStats()
    bar = tqdm(total=len(prompts), initial=len(done), unit="prompt", desc="prefopt: sampling", disable=None)
    try:
        with open(progress, "a", encoding="utf-8") as f:
            for k, batch in enumerate(plan):
                if all(i in done for i in batch):
                    continue
                samples = sample_batch(model, tokenizer, [rows[i] for i in batch], settings, settings.seed + k, stats)
                batch_prompts = [prompts[i] for i in batch]
                stats.plain_prompts += sum(isinstance(p.prompt, str) for p in batch_prompts)
                rewards = score_samples(reward, batch_prompts, samples)[0] if reward else None
                records = sample_records(batch_prompts, samples, rewards)
                _add_components(records, getattr(reward, "components", {}))
                f.write("".join(_line(k, i, record) for i, record in zip(batch, records, strict=True)))
                f.flush()
                os.fsync(f.fileno())
                done.update(zip(batch, records, strict=True))
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch(k)
    except BaseException:
        if not done:  # it failed before any batch was kept (a bad reward, say): nothing to resume
            progress.unlink(missing_ok=True)
        raise
    bar.close()
    write_jsonl(output, [done[i] for i in range(len(prompts))], overwrite=True)
    progress.unlink()
    return {"stats": stats, "resumed": len(prompts) - stats.prompts, "records": [done[i] for i in range(len(prompts))]}
