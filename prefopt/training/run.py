"""`train(config)`: from a TrainConfig to a finished run in OUTPUT_DIR.

Order matters for the user: configuration, loss and output folder are checked first,
then the data is read and validated, and only then are models loaded. So mistakes are
reported in seconds, not after a model load.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefopt.compat import grouped_query_attention_in_sdpa
from prefopt.config import ConfigError, TrainConfig
from prefopt.data import PreferenceCollator
from prefopt.data.cache import ChainedItems
from prefopt.distributed import launched_processes
from prefopt.errors import PrefoptError
from prefopt.losses import LossSpec, get_loss, get_loss_spec
from prefopt.models.quiet_logs import quiet_loading_bars, quiet_tied_weight_warnings
from prefopt.paths import cache_root
from prefopt.plugins import import_loss_module
from prefopt.training.guard import RunStart, begin_run
from prefopt.training.inputs import choose_reference, prepare_examples, tokenize_examples
from prefopt.training.layout import choose_share_prefix
from prefopt.training.report import write_run_report
from prefopt.training.sharding import sharding_summary
from prefopt.training.summary import build_summary, print_summary


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    metrics: dict = field(default_factory=dict)  # the last training log
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    reference: str = ""
    summary: dict = field(default_factory=dict)
    trainer: object = field(default=None, repr=False)  # the PreferenceTrainer, for notebooks and tests
    interrupted: str | None = None  # the signal that stopped the run early, if any


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _training_arguments(config: TrainConfig, has_eval: bool, precision=None, model=None):
    from prefopt.models.precision import resolve_precision, training_flags
    from prefopt.training.trainer import PreferenceArguments

    cuda = torch.cuda.is_available()
    precision = precision or resolve_precision(config, _device_type())
    return PreferenceArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_ratio=config.warmup_ratio,
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
        activation_checkpointing=config.gradient_checkpointing,
        **training_flags(precision),
        use_cpu=not cuda,
        report_to=config.report_to or "none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=_may_leave_weights_unused(model),
    )


def _may_leave_weights_unused(model) -> bool:
    """DDP's find_unused_parameters: True costs a walk of the whole autograd graph every step to
    find weights that got no gradient (transformers turns it on for every model that does not
    checkpoint). Every trained weight of a dense causal LM or reward model gets a gradient in every
    prefopt step (the skipped-batch zero reaches all of them too), so it is off, except for a
    mixture of experts, where an expert no token was routed to in a micro-batch gets none (and
    where the model is not known, as transformers does)."""
    config = getattr(model, "config", None)
    if config is None:
        return True
    text = config.get_text_config()
    experts = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    return any((getattr(text, name, 0) or 0) > 1 for name in experts)


def _load_reference(
    mode: str, config: TrainConfig, model, items, collator, extra_key: str, use_logits: bool, compute_dtype=None
):
    from prefopt.models.loading import load_reference_copy
    from prefopt.training.reference import CachedReference, ModelReference

    if mode == "none":
        return None
    if mode == "copy":
        copy = load_reference_copy(config, compute_dtype)
        return ModelReference(copy, chunk_size=config.chunk_size, use_logits=use_logits)
    if mode == "adapter":
        return ModelReference(disable_adapter=True, chunk_size=config.chunk_size, use_logits=use_logits)
    from prefopt.models.inference import inference_device

    # Scored where training will run, under the autocast around this call (the cache key names it):
    # the model is still where it loaded (the CPU), and CPU fp32 log-probs would not be the bf16
    # autocast ones on the GPU, so the step-0 log-ratio would not be 0. 4-bit weights loaded in place.
    device = inference_device()
    if not getattr(model, "is_loaded_in_4bit", False):
        model.to(device)
    # Before training the policy is the reference (full weights, or LoRA with B = 0), unless
    # --reference-model names other weights: those are loaded once, scored, and dropped.
    scorer = model
    if config.reference_model:
        scorer = load_reference_copy(config, compute_dtype)
        if not getattr(scorer, "is_loaded_in_4bit", False):
            scorer.to(device)
    return CachedReference.build(
        scorer, items, collator, cache_root() / "reference", extra_key, config.batch_size, device
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
    """Run training as `config` says; extra transformers `callbacks` are added to the trainer.

    Ctrl-C (SIGINT; a kernel interrupt in a notebook) or SIGTERM finishes the current step and
    saves a checkpoint; then SIGINT raises KeyboardInterrupt and SIGTERM returns a result with
    `interrupted` set. Signal handlers are restored however the run ends.
    """
    with contextlib.ExitStack() as cleanup:  # releases the output folder's lock however the run ends
        cleanup.enter_context(quiet_loading_bars())
        cleanup.enter_context(grouped_query_attention_in_sdpa(_device_type()))
        if int(os.environ.get("RANK", "0")) != 0:
            # Several processes (torchrun, accelerate): the start-up and summary lines come from the
            # main process once, not N times. Errors go to stderr, which every process keeps.
            cleanup.enter_context(contextlib.redirect_stdout(cleanup.enter_context(open(os.devnull, "w"))))
        return _train(config, callbacks, save_final, cleanup)


def _train(config: TrainConfig, callbacks: list | None, save_final: bool, cleanup: contextlib.ExitStack) -> TrainResult:
    from transformers import set_seed

    spec, loss_args = _resolve_loss(config)
    reference_mode = choose_reference(spec, config)
    set_seed(config.seed)
    # Data errors are reported before the output folder is touched, so fixing them needs no --overwrite.
    data = prepare_examples(config, spec)
    start, is_main = _claim_output_dir(config)
    cleanup.enter_context(start.lock)
    output_dir = start.output_dir
    if start.finished is not None:
        return _already_finished(start)
    trainer, stopper = _build_trainer(
        config, spec, loss_args, reference_mode, output_dir, data.train, data.eval, callbacks
    )
    checkpoint = _resume_point(config, output_dir, trainer, is_main)
    has_eval = trainer.eval_dataset is not None
    eval_before = trainer.evaluate(metric_key_prefix="eval_before") if has_eval and not checkpoint else {}
    eval_after, final_dir = {}, output_dir / "final"
    with _signals_and_memory(trainer.model, stopper, config.trim_memory):
        seconds = _fit(trainer, checkpoint, output_dir)
        if not stopper.stopped:
            # Training is done: a signal from here on is noted, not obeyed, so final/ is never half-written.
            eval_after = trainer.evaluate() if has_eval else {}  # the last step's, if one was scheduled
            if save_final:
                _save_final(trainer, final_dir, is_main)
    if stopper.stopped:
        return _stopped_early(stopper, trainer, output_dir, eval_before, reference_mode)
    if stopper.received:
        print(f"prefopt: {stopper.received} received after the last step; the run finished and saved final/ first")
    last = next((entry for entry in reversed(trainer.state.log_history) if "loss" in entry), {})
    summary = build_summary(trainer, last, seconds, reference_mode, eval_before, eval_after)
    if data.summary():
        summary["data"] = data.summary()
    sharding = sharding_summary(trainer)
    if sharding:
        summary["sharding"] = sharding
    if is_main:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        write_run_report(output_dir)  # report.png; never fails a run
        print_summary(summary, final_dir, paired=spec.paired)
    return TrainResult(
        output_dir=output_dir,
        final_dir=final_dir,
        steps=trainer.state.global_step,
        metrics=last,
        eval_before=eval_before,
        eval_after=eval_after,
        reference=reference_mode,
        summary=summary,
        trainer=trainer,
    )


def _resolve_loss(config: TrainConfig) -> tuple[LossSpec, dict]:
    """The loss's spec and its resolved hyperparameters (user losses imported first)."""
    for module in config.loss_module:
        import_loss_module(module)
    spec = get_loss_spec(config.loss)
    loss_args = spec.resolve(config.loss_args)
    if not config.data:
        raise ConfigError("no training data: pass --data FILE (or `data:` in the YAML)")
    return spec, loss_args


def _claim_output_dir(config: TrainConfig) -> tuple[RunStart, bool]:
    """(the locked and checked output folder, is this the main process). Several processes
    (torchrun / accelerate launch): only the first one locks and writes the folder; all check
    --resume against the run there (prefopt.training.guard has the rules)."""
    is_main = int(os.environ.get("RANK", "0")) == 0
    return begin_run(config, main=is_main), is_main


def _already_finished(start: RunStart) -> TrainResult:
    """--resume on a finished run: say so and change nothing."""
    for note in start.notes:
        print(f"prefopt: {note}")
    return TrainResult(
        output_dir=start.output_dir,
        final_dir=start.output_dir / "final",
        steps=start.finished,
        reference=start.summary.get("reference", ""),
        summary=start.summary,
    )


def _build_trainer(config, spec, loss_args, reference_mode, output_dir, train_examples, eval_examples, callbacks):
    """Load the policy, tokenize, pick the batch layout and reference; the trainer with its callbacks."""
    from prefopt.models import precision as prec
    from prefopt.models.loading import load_policy
    from prefopt.models.logps import head_matches_model
    from prefopt.training.callbacks import GradientGuard, MetricsFile, StopOnSignal, install_progress
    from prefopt.training.trainer import DictCollator, ListDataset, PreferenceTrainer

    precision = prec.resolve_precision(config, _device_type())  # config errors before the model loads
    if config.resume:  # continue with the arithmetic the run began with, whatever this machine would pick
        precision = prec.resumed_precision(config, precision, _recorded_state(output_dir).get("precision"))
    # A loss that trains a reward model gets a sequence classifier (num_labels=1), scored one row per sequence.
    classifier = spec.needs_sequence_scores
    model, tokenizer = load_policy(config, sequence_classifier=classifier, compute_dtype=precision.autocast)
    optimizer = prec.choose_optimizer(config.optimizer, model)
    print(f"prefopt: precision: {precision.describe()}; optimizer {optimizer}")
    train_items = tokenize_examples(train_examples, tokenizer, config, spec, "train")
    # one index space for both splits (eval's from len(train)): it keys the reference cache
    eval_items = (
        tokenize_examples(eval_examples, tokenizer, config, spec, "eval", len(train_items)) if eval_examples else []
    )
    all_items = ChainedItems(train_items, eval_items)
    probe = torch.tensor([tokenizer("probe")["input_ids"][:4] or [tokenizer.eos_token_id]])
    use_logits = not classifier and not head_matches_model(model, probe.to(next(model.parameters()).device))
    share_prefix = choose_share_prefix(config, spec, model, tokenizer, all_items, use_logits)
    collator = PreferenceCollator(
        tokenizer.pad_token_id, with_kl_pairs=spec.needs_kl_pairs, share_prefix=share_prefix, pack=config.pack
    )
    extra_key = f"{config.reference_model or config.model}|{config.dtype}|{config.load_in_4bit}|{config.lora}"
    if precision.autocast is not None:  # cached log-probs computed as training computes them
        extra_key += f"|autocast {precision.autocast}"
    with torch.autocast(_device_type(), dtype=precision.autocast or torch.float32, enabled=bool(precision.autocast)):
        reference = _load_reference(
            reference_mode, config, model, all_items, collator, extra_key, use_logits, precision.autocast
        )
    if getattr(reference, "path", None):
        print(f"prefopt: reference log-probs {'reused from' if reference.reused else 'cached in'} {reference.path}")
    rollouts = critic = None
    if spec.needs_value_model:  # PPO's critic: a value head on the policy's states, trained with it
        from prefopt.online.critic import value_head_for

        if launched_processes() > 1:  # its head is outside the DDP-wrapped model
            raise ConfigError(
                f"loss '{spec.name}' trains a value head that is not synchronised across processes "
                "yet: run it on one process (one GPU or the CPU)"
            )

        critic = value_head_for(model, use_logits)
    if spec.needs_rollouts:  # each step samples the batch's prompts and scores the completions
        from prefopt.online.step import PromptCollator, make_rollouts

        rollouts = make_rollouts(config, spec, tokenizer, share_prefix, use_logits, critic)

    args = _training_arguments(config, bool(eval_items), precision, model)
    trainer = PreferenceTrainer(
        model=model,
        args=args,
        optimizer_cls_and_kwargs=prec.optimizer_cls_and_kwargs(optimizer, config, args),
        train_dataset=ListDataset(train_items),
        eval_dataset=ListDataset(eval_items) if eval_items else None,
        data_collator=PromptCollator() if rollouts else DictCollator(collator),
        processing_class=tokenizer,
        loss_fn=get_loss(config.loss),
        loss_args=loss_args,
        reference=reference,
        rollouts=rollouts,
        critic=critic,
        value_learning_rate=config.value_learning_rate,
        chunk_size=config.chunk_size,
        use_logits=use_logits,
        group_by_length=config.group_by_length,
        skip_nonfinite=config.skip_nonfinite,
    )
    trainer.precision_record = prec.precision_record(precision)  # kept in each checkpoint
    if precision.autocast is not None and not trainer.is_deepspeed_enabled:  # (DeepSpeed: its engines cast)
        _frozen_in_compute_dtype(model, reference, precision.autocast)
    install_progress(trainer)
    trainer.add_callback(MetricsFile(output_dir / "metrics.jsonl"))
    trainer.add_callback(GradientGuard(trainer))
    if optimizer == "adamw" and prec.low_precision_trainable(model):
        trainer.add_callback(prec.DroppedUpdates())  # warns with the share of weights that moved
    if critic is not None:
        from prefopt.online.critic import value_head_callback

        trainer.add_callback(value_head_callback(critic))
    stopper = StopOnSignal()
    trainer.add_callback(stopper)
    for callback in callbacks or []:
        trainer.add_callback(callback)
    return trainer, stopper


def _frozen_in_compute_dtype(policy, reference, compute: torch.dtype) -> None:
    """Under autocast, the frozen copies' Linear weights (the reference copy's, a LoRA base's) are kept
    in the compute dtype: the same scores, without a cast per call (prefopt.models.precision). Done
    after the reference cache is built: its key hashes the weights as they loaded."""
    from prefopt.models.precision import frozen_weights_in_compute_dtype

    saved = frozen_weights_in_compute_dtype(policy, compute)
    copy = getattr(reference, "model", None)
    if copy is not None:
        saved += frozen_weights_in_compute_dtype(copy, compute)
    if hasattr(reference, "compute_dtype"):
        reference.compute_dtype = compute  # its forwards run under this autocast wherever they are called
    if saved:
        name = str(compute).removeprefix("torch.")
        print(
            f"prefopt: precision: frozen weights kept in {name} (reference copy, LoRA base): {saved / 1e9:.2f} GB less"
        )


def _recorded_state(output_dir: Path) -> dict:
    """prefopt_state.json of the newest checkpoint ({} when there is none)."""
    from prefopt.training.trainer import PREFOPT_STATE

    checkpoint = _newest_checkpoint(output_dir)
    path = checkpoint / PREFOPT_STATE if checkpoint else None
    return json.loads(path.read_text()) if path and path.exists() else {}


def _resume_point(config: TrainConfig, output_dir: Path, trainer, is_main: bool) -> Path | None:
    """The checkpoint to continue from (None: start at step 0); prefopt's own state restored."""
    checkpoint = _newest_checkpoint(output_dir) if config.resume else None
    if checkpoint:
        trainer.restore_prefopt_state(checkpoint)
        quiet_tied_weight_warnings(trainer.model)  # "missing lm_head.weight" with tied embeddings is not missing
    if config.resume and is_main:
        step = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
        _trim_metrics(output_dir / "metrics.jsonl", step)
        print(f"prefopt: resuming from {checkpoint}" if checkpoint else "prefopt: no checkpoint yet; starting over")
    return checkpoint


@contextlib.contextmanager
def _signals_and_memory(model, stopper, trim_memory: bool):
    """While training and saving: SIGINT/SIGTERM go to `stopper` (finish the step, then save)
    and freed memory is trimmed every few layers. Both are undone however the block ends."""
    from prefopt.training.memory import trim_every_layers

    # Signal handlers can only be set from the main thread (a notebook's cells run there).
    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stopper.handle) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    trimmer = trim_every_layers(model) if trim_memory else None
    try:
        yield
    finally:
        if trimmer is not None:
            trimmer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fit(trainer, checkpoint: Path | None, output_dir: Path) -> float:
    """trainer.train from `checkpoint`; returns the wall seconds. A prefopt error names the last good checkpoint."""
    trainer.start_clock()
    started = time.time()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except PrefoptError as error:
        last = _newest_checkpoint(output_dir)
        raise type(error)(f"{error}; last good checkpoint: {last.name if last else 'none yet'}") from None
    return time.time() - started


def _save_final(trainer, final_dir: Path, is_main: bool) -> None:
    from prefopt.models.precision import fold_compensation

    # bf16 weights with Kahan-compensated AdamW: final/ gets weight + compensation (fp32), not the
    # bf16 weights alone, which lack the sub-ulp progress (prefopt.models.precision)
    if fold_compensation(trainer.model, trainer.optimizer) and is_main:
        print("prefopt: final/ holds float32 weights: the bf16 weights plus their Kahan compensation")
    trainer.save_model(str(final_dir))  # writes on the main process only
    if is_main:
        trainer.processing_class.save_pretrained(str(final_dir))
        (final_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; config.yaml has the settings
        if trainer.critic is not None:  # PPO's value head, to continue training from final/
            trainer.critic.save(final_dir)


def _stopped_early(stopper, trainer, output_dir: Path, eval_before: dict, reference_mode: str) -> TrainResult:
    """A signal cut the run short (a checkpoint is saved): say how to resume; SIGINT raises."""
    step = trainer.state.global_step
    message = (
        f"{stopper.received} received: stopped at step {step} and saved a checkpoint; "
        f"continue with: prefopt train --config {output_dir / 'config.yaml'} --resume"
    )
    print(f"prefopt: {message}")
    if stopper.received == "SIGINT":
        raise KeyboardInterrupt(message)
    return TrainResult(
        output_dir=output_dir,
        final_dir=output_dir / "final",
        steps=step,
        eval_before=eval_before,
        reference=reference_mode,
        trainer=trainer,
        interrupted=stopper.received,
    )
