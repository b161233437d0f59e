"""`train(config)`: from a TrainConfig to a finished run in OUTPUT_DIR.

Order matters for the user: configuration, loss and output folder are checked first,
then the data is read and validated, and only then are models loaded. So mistakes are
reported in seconds, not after a model load.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefopt.config import ConfigError, TrainConfig
from prefopt.data import (
    PreferenceCollator,
    PreferenceTokenizer,
    SingleExample,
    attach_mismatched_completions,
    load_examples,
    pairs_to_singles,
    split_held_out,
)
from prefopt.errors import PrefoptError
from prefopt.hub import cache_root
from prefopt.losses import LossSpec, get_loss, get_loss_spec
from prefopt.outputs import prepare_output_dir
from prefopt.plugins import import_loss_module


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    metrics: dict  # the last training log
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    reference: str = ""
    summary: dict = field(default_factory=dict)
    trainer: object = field(default=None, repr=False)  # the PreferenceTrainer, for notebooks and tests
    interrupted: str | None = None  # the signal that stopped the run early, if any


def choose_reference(spec: LossSpec, config: TrainConfig) -> str:
    """The reference mode that serves this loss: from its declared needs and the config."""
    mode = config.reference
    if not spec.needs_reference:
        return "none"
    if mode == "none":
        raise ConfigError(f"loss '{spec.name}' needs a reference model; reference=none cannot serve it")
    if mode == "auto":
        return "adapter" if config.lora else "copy"
    if mode == "adapter" and not config.lora:
        raise ConfigError("reference=adapter needs --lora (the reference is the model with its adapter disabled)")
    if mode == "cached" and spec.needs_token_kl:
        raise ConfigError(
            f"reference=cached cannot serve loss '{spec.name}': it needs the token-level KL over the full "
            "vocabulary at every step, which needs the reference's distributions, not cached log-probs; "
            "use reference=copy or reference=adapter"
        )
    return mode


def _prepare_examples(config: TrainConfig, spec: LossSpec):
    train_examples, report = load_examples(config.data, config.format)
    for warning in report.warnings:
        print(f"prefopt: data: {warning}")
    eval_examples = []
    if config.eval_data:
        eval_examples, _ = load_examples(config.eval_data, config.format)
    elif config.eval_fraction > 0:
        train_examples, eval_examples = split_held_out(train_examples, config.eval_fraction, config.seed)
    unpaired = isinstance(train_examples[0], SingleExample)
    if spec.paired and unpaired:
        raise PrefoptError(
            f"loss '{spec.name}' needs paired data (prompt/chosen/rejected); {', '.join(config.data)} is unpaired"
        )
    if not spec.paired and not unpaired:
        train_examples, eval_examples = pairs_to_singles(train_examples), pairs_to_singles(eval_examples)
    return train_examples, eval_examples, report


def _tokenize(examples: list, tokenizer, config: TrainConfig, spec: LossSpec, label: str) -> list:
    tokenizing = PreferenceTokenizer(tokenizer, config.max_length, config.max_prompt_length)
    items = tokenizing.all(examples)
    rep = tokenizing.report
    if rep.truncated or rep.dropped_too_long:
        print(
            f"prefopt: {label}: {rep.truncated} truncated, {rep.dropped_too_long} dropped (max_length {config.max_length})"
        )
    if spec.needs_kl_pairs:
        attach_mismatched_completions(items, config.max_length)
    return items


def _training_arguments(config: TrainConfig, has_eval: bool):
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    autocast_bf16 = cuda and config.dtype == "auto" and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if has_eval and config.eval_steps else "no",
        eval_steps=config.eval_steps,
        seed=config.seed,
        gradient_checkpointing=config.gradient_checkpointing,
        bf16=autocast_bf16,
        use_cpu=not cuda,
        report_to=config.report_to or "none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def _shared_prefix_works(model, tokenizer, use_logits: bool) -> bool:
    """Does this model honour a custom 4-D mask and position ids? Compare both layouts on one pair."""
    from prefopt.data import PairExample
    from prefopt.logps import completion_states, output_head, score_completions

    pair = PreferenceTokenizer(tokenizer, 64).pair(PairExample("Is the sky blue?", " Yes, it is.", " No.", ""), 0)
    device = next(model.parameters()).device
    head = torch.nn.Identity() if use_logits else output_head(model)
    results = []
    with torch.no_grad():
        for share in (False, True):
            batch = PreferenceCollator(tokenizer.pad_token_id, share_prefix=share)([pair]).to(device)
            try:
                results.append(score_completions(head, completion_states(model, batch, use_logits))[0])
            except Exception:  # a model that rejects 4-D masks or position ids: use the plain layout
                return False
    return torch.allclose(results[0], results[1], atol=1e-3, rtol=1e-4)


def _load_reference(mode: str, config: TrainConfig, model, items, collator, extra_key: str, use_logits: bool):
    from prefopt.model import load_reference_copy
    from prefopt.reference import CachedReference, ModelReference

    if mode == "none":
        return None
    if mode == "copy":
        return ModelReference(load_reference_copy(config), chunk_size=config.chunk_size, use_logits=use_logits)
    if mode == "adapter":
        return ModelReference(disable_adapter=True, chunk_size=config.chunk_size, use_logits=use_logits)
    device = next(model.parameters()).device
    # Before training the policy is the reference (full weights, or LoRA with B = 0).
    return CachedReference.build(
        model, items, collator, cache_root() / "reference", extra_key, config.batch_size, device
    )


def _newest_checkpoint(output_dir: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(output_dir))
    return Path(found) if found else None


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint: they will be logged again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def train(config: TrainConfig, callbacks: list | None = None, save_final: bool = True) -> TrainResult:
    """Run training as `config` says; extra transformers `callbacks` are added to the trainer."""
    from transformers import set_seed

    from prefopt.callbacks import ConsoleProgress, GradientGuard, MetricsFile, StopOnSignal
    from prefopt.logps import head_matches_model
    from prefopt.memory import trim_every_layers
    from prefopt.model import load_policy
    from prefopt.trainer import DictCollator, ListDataset, PreferenceTrainer

    for module in config.loss_module:
        import_loss_module(module)
    spec = get_loss_spec(config.loss)
    loss_args = spec.resolve(config.loss_args)
    if not config.data:
        raise ConfigError("no training data: pass --data FILE (or `data:` in the YAML)")
    reference_mode = choose_reference(spec, config)
    set_seed(config.seed)
    # Data errors are reported before the output folder is touched, so fixing them needs no --overwrite.
    train_examples, eval_examples, _ = _prepare_examples(config, spec)
    # Several processes (torchrun / accelerate launch): only the first one checks and writes the folder.
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        output_dir = prepare_output_dir(config.output_dir, config.resume, config.overwrite)
        if not config.resume:
            config.save(output_dir / "config.yaml")
    else:
        output_dir = Path(config.output_dir)

    model, tokenizer = load_policy(config)
    train_items = _tokenize(train_examples, tokenizer, config, spec, "train")
    eval_items = _tokenize(eval_examples, tokenizer, config, spec, "eval") if eval_examples else []
    for item in eval_items:  # one index space for both splits: it keys the reference cache
        item.index += len(train_items)
    probe = torch.tensor([tokenizer("probe")["input_ids"][:4] or [tokenizer.eos_token_id]])
    use_logits = not head_matches_model(model, probe.to(next(model.parameters()).device))
    # Pairs share their prompt; so do KTO's examples and their mismatched (KL) completions.
    layout_shares = spec.paired or spec.needs_kl_pairs
    share_prefix = config.share_prefix and layout_shares and _shared_prefix_works(model, tokenizer, use_logits)
    if config.share_prefix and layout_shares and not share_prefix:
        print("prefopt: this model does not take a custom 4-D attention mask; prompts are not shared")
    collator = PreferenceCollator(
        tokenizer.pad_token_id, with_kl_pairs=spec.needs_kl_pairs, share_prefix=share_prefix, pack=config.pack
    )
    extra_key = f"{config.model}|{config.dtype}|{config.load_in_4bit}|{config.lora}"
    reference = _load_reference(
        reference_mode, config, model, train_items + eval_items, collator, extra_key, use_logits
    )
    if getattr(reference, "path", None):
        print(f"prefopt: reference log-probs {'reused from' if reference.reused else 'cached in'} {reference.path}")

    trainer = PreferenceTrainer(
        model=model,
        args=_training_arguments(config, bool(eval_items)),
        train_dataset=ListDataset(train_items),
        eval_dataset=ListDataset(eval_items) if eval_items else None,
        data_collator=DictCollator(collator),
        processing_class=tokenizer,
        loss_fn=get_loss(config.loss),
        loss_args=loss_args,
        reference=reference,
        chunk_size=config.chunk_size,
        use_logits=use_logits,
        group_by_length=config.group_by_length,
        skip_nonfinite=config.skip_nonfinite,
    )
    trainer.remove_callback(
        next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "ProgressCallback")
    )
    trainer.add_callback(ConsoleProgress())
    trainer.add_callback(MetricsFile(output_dir / "metrics.jsonl"))
    trainer.add_callback(GradientGuard(trainer))
    stopper = StopOnSignal()
    trainer.add_callback(stopper)
    for callback in callbacks or []:
        trainer.add_callback(callback)

    checkpoint = _newest_checkpoint(output_dir) if config.resume else None
    if config.resume and is_main:
        step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
        _trim_metrics(output_dir / "metrics.jsonl", step)
        print(f"prefopt: resuming from {checkpoint}" if checkpoint else "prefopt: no checkpoint yet; starting over")
    eval_before = trainer.evaluate(metric_key_prefix="eval_before") if eval_items and not checkpoint else {}
    trainer.start_clock()
    started = time.time()
    # Signal handlers can only be set from the main thread (a notebook's cells run there).
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stopper.handle) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}

    def restore_signals():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    trimmer = trim_every_layers(model) if config.trim_memory else None
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except BaseException as error:
        restore_signals()
        if isinstance(error, PrefoptError):
            last = _newest_checkpoint(output_dir)
            raise type(error)(f"{error}; last good checkpoint: {last.name if last else 'none yet'}") from None
        raise
    finally:
        if trimmer is not None:
            trimmer.close()
    seconds = time.time() - started
    if stopper.stopped:
        restore_signals()
        print(
            f"prefopt: {stopper.received} received: stopped at step {trainer.state.global_step} and saved a "
            f"checkpoint; continue with: prefopt train --config {output_dir / 'config.yaml'} --resume"
        )
        return TrainResult(
            output_dir,
            output_dir / "final",
            trainer.state.global_step,
            {},
            eval_before,
            {},
            reference_mode,
            {},
            trainer,
            interrupted=stopper.received,
        )
    # Training is done: a signal from here on is noted, not obeyed, so final/ is never left half-written.
    try:
        eval_after = trainer.evaluate() if eval_items else {}
        final_dir = output_dir / "final"
        if save_final:
            trainer.save_model(str(final_dir))  # writes on the main process only
            if is_main:
                tokenizer.save_pretrained(str(final_dir))
                (final_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; config.yaml has the settings
    finally:
        restore_signals()
    if stopper.received:
        print(f"prefopt: {stopper.received} received after the last step; the run finished and saved final/ first")
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = logs[-1] if logs else {}
    summary = {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 2),
        "tokens_per_s": last.get("tokens_per_s"),
        "final_loss": last.get("loss"),
        "reward_accuracy": last.get("rewards/accuracies"),
        "reward_margin": last.get("rewards/margins"),
        "reference": reference_mode,
        "eval_before": eval_before,
        "eval_after": eval_after,
    }
    if is_main:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        _print_summary(summary, final_dir)
    return TrainResult(
        output_dir,
        final_dir,
        trainer.state.global_step,
        last,
        eval_before,
        eval_after,
        reference_mode,
        summary,
        trainer,
    )


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_summary(summary: dict, final_dir: Path) -> None:
    print(
        f"prefopt: done: {summary['steps']} steps in {summary['seconds']:.1f}s, "
        f"{_fmt(summary['tokens_per_s'])} tokens/s, loss {_fmt(summary['final_loss'])}, "
        f"reward accuracy {_fmt(summary['reward_accuracy'])}, margin {_fmt(summary['reward_margin'])}"
    )
    for label, prefix in (("before", "eval_before_"), ("after", "eval_")):
        values = {k[len(prefix) :]: v for k, v in summary[f"eval_{label}"].items()}
        if values:
            print(
                f"prefopt: held-out {label:<6}: loss {_fmt(values.get('loss'))}, reward accuracy "
                f"{_fmt(values.get('rewards/accuracies'))}, margin {_fmt(values.get('rewards/margins'))}, "
                f"policy prefers chosen {_fmt(values.get('policy/prefers_chosen'))}"
            )
    print(f"prefopt: final model in {final_dir}")
