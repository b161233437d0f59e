"""Precision (issue #15): bf16 weights that still learn, mixed bf16 for every loss, and `auto`.

The figures in the comments were measured on the development machine (2 shared cores, AMD EPYC
with AVX512-BF16); the tolerances leave room for other CPUs' float kernels.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import SAMPLES, read_metrics
from safetensors.torch import load_file

from prefopt import TrainConfig, train
from prefopt.config import ConfigError, ConfigValueError
from prefopt.models import precision as prec
from prefopt.models.logps import _LinearHeadLogps, _LinearHeadLogpsKL
from prefopt.training.run import _training_arguments

REQUIRED_LOSSES = ("dpo", "dpop", "tdpo1", "tdpo2", "orpo", "kto")


def run(tmp_path, model_dir, name, **overrides):
    config = dict(
        model=model_dir,
        data=[str(SAMPLES / "standard.jsonl")],
        output_dir=str(tmp_path / name),
        batch_size=2,
        logging_steps=1,
        max_length=64,
        save_steps=1000,
        seed=0,
    )
    config.update(overrides)
    result = train(TrainConfig(**config))
    losses = [m["loss"] for m in read_metrics(result.output_dir) if "loss" in m]
    return result, losses


def weight_updates(model_dir, result, start_dtype) -> dict[str, torch.Tensor]:
    """final/ minus the weights the run started from (the saved fp32 ones, rounded to `start_dtype`)."""
    before = load_file(Path(model_dir) / "model.safetensors")
    after = load_file(result.final_dir / "model.safetensors")
    return {k: after[k].float() - before[k].to(start_dtype).float() for k in before}


def share_changed(updates: dict[str, torch.Tensor]) -> float:
    return sum(int((u != 0).sum()) for u in updates.values()) / sum(u.numel() for u in updates.values())


def relative_error(updates: dict, reference: dict) -> float:
    num = sum(float(((updates[k] - reference[k]) ** 2).sum()) for k in reference)
    return math.sqrt(num / sum(float((r**2).sum()) for r in reference.values()))


# -- 1. low-precision weights that still learn ----------------------------------------------------


def test_bf16_weights_learn_like_fp32_at_lr_1e6(tmp_path, tiny_model_dir, capsys):
    """20 steps at lr 1e-6: bf16 weights with Kahan-compensated AdamW (the default for them) move the
    same weights as fp32, by the same amounts; plain AdamW on bf16 weights drops almost every update,
    and says so with the measured share.

    Tolerances, and why:
    - share of weights changed within 1 point of fp32 (measured: equal, 88.5% both; the rest get
      no gradient, e.g. embeddings of bytes the data never uses);
    - the total update within 10% (relative L2) of fp32's (measured 3.5%): the gradients themselves
      come from a bf16 forward and backward (2^-8 relative rounding per op), Adam divides them by
      their own scale, so a few percent is the floor; 10% leaves room for other CPUs' kernels;
    - every logged loss within 2e-3 of fp32's (measured 6.7e-4): at lr 1e-6 the loss moves only
      ~1.5e-4 from ln 2 in 20 steps, less than the bf16 forward's rounding of the log-ratios, so the
      loss curve cannot tell the runs apart and the weights are the discriminating check. The plain
      run (below) passes the loss check as well, and fails the weight checks by two orders of magnitude.
    """
    common = dict(max_steps=20, learning_rate=1e-6)
    fp32, fp32_losses = run(tmp_path, tiny_model_dir, "fp32", **common)
    kahan, kahan_losses = run(tmp_path, tiny_model_dir, "kahan", dtype="bfloat16", **common)
    plain, _ = run(tmp_path, tiny_model_dir, "plain", dtype="bfloat16", optimizer="adamw", **common)
    reference = weight_updates(tiny_model_dir, fp32, torch.float32)
    fixed = weight_updates(tiny_model_dir, kahan, torch.bfloat16)
    dropped = weight_updates(tiny_model_dir, plain, torch.bfloat16)

    assert share_changed(reference) > 0.8
    assert abs(share_changed(fixed) - share_changed(reference)) <= 0.01
    assert relative_error(fixed, reference) <= 0.10
    assert len(kahan_losses) == len(fp32_losses) == 20
    assert max(abs(a - b) for a, b in zip(kahan_losses, fp32_losses, strict=True)) <= 2e-3

    # without the fix: measured 1.7% of the weights moved and 99.4% of the update lost
    assert share_changed(dropped) < 0.05
    assert relative_error(dropped, reference) > 0.9
    probe = next(c for c in plain.trainer.callback_handler.callbacks if isinstance(c, prec.DroppedUpdates))
    assert probe.changed is not None and probe.changed < 0.05
    out = capsys.readouterr().out
    assert f"only {probe.changed:.2%} of the bf16/fp16 weights changed" in out
    assert "optimizer adamw_kahan" in out  # the default chose the fix for bf16 weights
    # final/ of the Kahan run holds weight + compensation (fp32), so it carries the progress
    assert load_file(kahan.final_dir / "model.safetensors")["lm_head.weight"].dtype == torch.float32


def test_no_probe_and_plain_adamw_on_fp32_weights(tmp_path, tiny_model_dir):
    result, _ = run(tmp_path, tiny_model_dir, "fp32", max_steps=1, mixed_precision="no")
    callbacks = result.trainer.callback_handler.callbacks
    assert not any(isinstance(c, prec.DroppedUpdates) for c in callbacks)
    assert type(result.trainer.optimizer.optimizer).__name__ == "AdamW"
    assert type(result.trainer.optimizer.optimizer).__module__.startswith("torch.")


# -- 2. mixed bf16: fp32 master weights, bf16 compute ---------------------------------------------


@pytest.mark.parametrize("name", REQUIRED_LOSSES)
def test_mixed_bf16_matches_fp32_for_every_loss(name, tmp_path, tiny_model_dir):
    """3 steps at lr 1e-3 (the policy leaves the reference after step 1), fp32 vs bf16 autocast.

    Tolerance: every logged loss within 1% of fp32's, relative to max(1, |loss|) (measured at most
    ~0.2%). bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); the log-prob sums, the KL
    and the loss itself stay fp32, so the loss inherits about that from the logits, plus the slightly
    different steps 1-2 took. The weights stay fp32 (master weights) and all of them are trained.
    """
    data = "unpaired.jsonl" if name == "kto" else "standard.jsonl"
    common = dict(loss=name, max_steps=3, learning_rate=1e-3, data=[str(SAMPLES / data)])
    fp32, fp32_losses = run(tmp_path, tiny_model_dir, "fp32", mixed_precision="no", **common)
    mixed, mixed_losses = run(tmp_path, tiny_model_dir, "mixed", mixed_precision="bf16", **common)
    assert mixed.trainer.args.bf16 and not fp32.trainer.args.bf16
    assert all(p.dtype == torch.float32 for p in mixed.trainer.model.parameters())
    assert len(mixed_losses) == len(fp32_losses) == 3
    for a, b in zip(mixed_losses, fp32_losses, strict=True):
        assert math.isfinite(a) and abs(a - b) <= 0.01 * max(1.0, abs(b)), (mixed_losses, fp32_losses)
    if name in ("dpo", "dpop", "tdpo1", "tdpo2"):  # policy == reference at step 1, computed the same way
        assert mixed_losses[0] == pytest.approx(math.log(2), abs=1e-6)
        # ... although the frozen copy's projections are bf16 now (what autocast makes of the fp32 ones)
        copy = mixed.trainer.reference.model
        linears = [m for m in copy.modules() if type(m) is torch.nn.Linear and m is not copy.get_output_embeddings()]
        assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
        assert copy.get_output_embeddings().weight.dtype == torch.float32  # the head stays (TDPO's fp32 KL)
        assert copy.get_input_embeddings().weight.dtype == torch.float32  # lookups: the residual stays fp32


@pytest.mark.parametrize("reference", [dict(reference="cached"), dict(reference="adapter", lora=True)])
def test_mixed_bf16_reference_modes_start_at_log_ratio_zero(reference, tmp_path, tiny_model_dir):
    """The cached reference is computed under the run's autocast (and keyed by it), the adapter-off
    reference under the trainer's: at step 1 policy == reference, so DPO's loss is ln 2."""
    _, losses = run(
        tmp_path, tiny_model_dir, "run", max_steps=2, learning_rate=1e-3, mixed_precision="bf16", **reference
    )
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert math.isfinite(losses[1])


def test_frozen_weights_in_compute_dtype_score_exactly_as_autocast_does():
    """The frozen projections are cast to bf16, since autocast casts them on every call anyway: the
    logits are bitwise equal. Trained weights, embeddings, the output head and a weight the head
    shares with the embedding stay fp32; the bytes saved are 2 per cast weight."""
    from helpers import tiny_llama

    for tied in (True, False):
        model = tiny_llama(0)
        model.config.tie_word_embeddings = tied
        if not tied:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        else:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.requires_grad_(False)
        model.model.layers[1].mlp.down_proj.weight.requires_grad_(True)  # a trained weight stays as it is
        ids = torch.randint(1, 259, (2, 11), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            before = model(input_ids=ids).logits
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not model.lm_head]
        expected = sum(m.weight.numel() * 2 for m in linears) - model.model.layers[1].mlp.down_proj.weight.numel() * 2
        assert prec.frozen_weights_in_compute_dtype(model, torch.bfloat16) == expected
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            after = model(input_ids=ids).logits
        assert torch.equal(before, after)
        assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
        assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.float32
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert prec.frozen_weights_in_compute_dtype(model, torch.bfloat16) == 0  # nothing left to cast


def test_mixed_bf16_lora_keeps_its_base_in_bf16_and_adapters_in_fp32(tmp_path, tiny_model_dir):
    """LoRA under mixed precision: the frozen base projections are bf16 (no cast per call, half the
    memory), the adapters fp32 master weights that train; adapter-off reference: ln 2 at step 1."""
    result, losses = run(
        tmp_path, tiny_model_dir, "run", max_steps=2, learning_rate=1e-3, mixed_precision="bf16", lora=True
    )
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    named = dict(result.trainer.model.named_parameters())
    trained = {n for n, p in named.items() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert all(named[n].dtype == torch.float32 for n in trained)
    base = [n for n, p in named.items() if "base_layer.weight" in n]
    assert base and all(named[n].dtype == torch.bfloat16 for n in base)


def test_fused_head_sums_stay_fp32_under_autocast():
    """Under bf16 autocast the fused heads return fp32. TDPO's KL is computed in fp32 throughout
    (equal to the no-autocast KL to fp32 rounding); the log-probs come from the autocast logits, bit
    for bit as `_LinearHeadLogps` (the reference's path) makes them, so a policy equal to its
    reference has log-ratios of exactly 0. Gradients match float64 to bf16 accuracy (1%): backward
    recomputes the logits under the forward's autocast."""
    torch.manual_seed(0)
    hidden = torch.randn(12, 16)
    weight = 0.3 * torch.randn(300, 16)
    targets = torch.randint(0, 300, (12,))
    ref_hidden, ref_weight = hidden + 0.01 * torch.randn(12, 16), weight + 0.01

    def scores(autocast: bool, dtype=torch.float32, kl: bool = True):
        h, w = (t.detach().to(dtype).clone().requires_grad_() for t in (hidden, weight))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if kl:
                logps, token_kl = _LinearHeadLogpsKL.apply(h, w, targets, ref_hidden.to(dtype), ref_weight.to(dtype), 5)
            else:
                logps, token_kl = _LinearHeadLogps.apply(h, w, targets, 5), torch.zeros(())
        (logps.sum() + token_kl.sum()).backward()
        return logps, token_kl, h.grad, w.grad

    exact, mixed, f64 = scores(False), scores(True), scores(False, torch.float64)
    assert mixed[0].dtype == mixed[1].dtype == torch.float32
    torch.testing.assert_close(mixed[1], exact[1], rtol=1e-5, atol=1e-6)  # the KL: fp32 under autocast
    assert torch.equal(mixed[0], scores(True, kl=False)[0])  # log-probs: as the reference computes them
    assert not torch.equal(mixed[0], exact[0])  # (which are the bf16 logits' own)
    for i in (0, 2, 3):  # log-probs and gradients (the KL, ~1e-4 here, is checked against fp32 above)
        assert (mixed[i].double() - f64[i]).norm() <= 1e-2 * f64[i].norm()
    for a, b in zip(scores(True, kl=False), scores(False, torch.float64, kl=False), strict=True):
        assert a.dtype == torch.float32 or a.dim() == 0
        assert (a.double() - b).norm() <= 1e-2 * max(b.norm(), 1e-12)


# -- 3. what `auto` picks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "flags", "expected"),
    [
        (True, True, set(), "AMX"),
        (False, True, set(), "AVX512-BF16"),
        (False, False, {"avx512_bf16"}, "AVX512-BF16"),  # torch's private probes missing: /proc/cpuinfo
        (False, False, {"amx_bf16", "avx512f"}, "AMX"),
        (False, False, {"bf16"}, "ARM BF16"),
        (False, False, {"avx512f", "avx2"}, None),  # AVX512 alone: oneDNN emulates bf16, slower than fp32
    ],
)
def test_bf16_units_from_cpu_capability(monkeypatch, amx, avx512_bf16, flags, expected):
    monkeypatch.delenv(prec.UNITS_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(prec, "_cpu_flags", lambda: flags)
    assert prec.bf16_units("cpu") == expected
    monkeypatch.setenv(prec.UNITS_ENV, "0")
    assert prec.bf16_units("cpu") is None
    monkeypatch.setenv(prec.UNITS_ENV, "1")
    assert prec.bf16_units("cpu")


@pytest.mark.parametrize("units", ["AMX", "AVX512-BF16", None])
def test_auto_picks_mixed_bf16_exactly_when_the_hardware_has_bf16_units(monkeypatch, units):
    monkeypatch.setattr(prec, "bf16_units", lambda device_type: units)
    config = TrainConfig(data=["x.jsonl"])  # dtype auto, mixed_precision auto
    precision = prec.resolve_precision(config, "cpu")
    assert precision.weights == torch.float32  # auto weights are fp32 (master weights) everywhere
    assert precision.autocast == (torch.bfloat16 if units else None)
    args = _training_arguments(config, has_eval=False, precision=precision)
    assert args.bf16 is bool(units) and not args.fp16
    # bf16 weights gain nothing from autocast: auto leaves it off
    assert prec.resolve_precision(TrainConfig(data=["x"], dtype="bfloat16"), "cpu").autocast is None
    # an explicit choice is kept either way
    assert prec.resolve_precision(TrainConfig(data=["x"], mixed_precision="no"), "cpu").autocast is None
    assert prec.resolve_precision(TrainConfig(data=["x"], mixed_precision="bf16"), "cpu").autocast == torch.bfloat16


def test_precision_choices_are_checked():
    with pytest.raises(ConfigValueError, match="mixed_precision: must be one of auto, no, bf16, fp16"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ConfigValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        prec.resolve_precision(TrainConfig(data=["x"], mixed_precision="fp16"), "cpu")
    with pytest.raises(ConfigError, match="mixes two 16-bit formats"):
        prec.resolve_precision(TrainConfig(data=["x"], dtype="float16", mixed_precision="bf16"), "cuda")
    # issue #19 item 6: accepted before, then the GradScaler refused to unscale fp16 gradients at step 1
    with pytest.raises(ConfigError, match="loss scaling needs float32 master weights"):
        prec.resolve_precision(TrainConfig(data=["x"], dtype="float16", mixed_precision="fp16"), "cuda")
    assert prec.resolve_precision(TrainConfig(data=["x"], mixed_precision="fp16"), "cuda").autocast == torch.float16


def test_an_fp16_scale_overflow_is_the_scalers_to_handle_not_a_divergence():
    """Issue #19 item 6: with fp16 loss scaling an inf gradient norm is the scale overflowing, which
    the GradScaler answers by skipping the step; the guard used to stop the run for it."""
    from types import SimpleNamespace

    from prefopt.training.callbacks import GradientGuard

    calls = []
    trainer = SimpleNamespace(
        step_grad_norm=float("inf"), last_example_indices=[0], nonfinite=lambda *a: calls.append(a),
        accelerator=SimpleNamespace(scaler=object()),
    )  # fmt: skip
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    GradientGuard(trainer).on_pre_optimizer_step(None, None, None, model=model)
    assert calls == [] and model.weight.grad is not None
    trainer.accelerator.scaler, trainer.step_grad_norm = None, float("inf")  # no scaler: a divergence
    GradientGuard(trainer).on_pre_optimizer_step(None, None, None, model=model)
    assert len(calls) == 1 and model.weight.grad is None


def test_auto_optimizer_follows_the_trained_weights():
    fp32 = torch.nn.Linear(2, 2)
    bf16 = torch.nn.Linear(2, 2).to(torch.bfloat16)
    frozen_bf16 = torch.nn.Linear(2, 2).to(torch.bfloat16).requires_grad_(False)  # a LoRA base
    assert prec.choose_optimizer("auto", fp32) == "adamw"
    assert prec.choose_optimizer("auto", bf16) == "adamw_kahan"
    assert prec.choose_optimizer("auto", frozen_bf16) == "adamw"
    assert prec.choose_optimizer("adamw", bf16) == "adamw"


def test_a_precision_change_is_refused_on_resume(tmp_path, tiny_model_dir):
    from prefopt.training.guard import config_differences

    saved = json.loads(json.dumps(TrainConfig(data=["x"]).to_dict()))
    changed = TrainConfig(data=["x"], mixed_precision="bf16", optimizer="adamw", dtype="bfloat16")
    differences = config_differences(saved, changed, tmp_path)
    for name in ("dtype", "mixed_precision", "optimizer"):
        assert any(d.startswith(f"{name}:") for d in differences), differences


@pytest.mark.parametrize("begun,resumed", [("0", "1"), ("1", "0")])
def test_resume_on_another_cpu_keeps_the_precision_the_run_began_with(
    begun, resumed, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """`mixed_precision: auto` is fp32 on a CPU without bf16 units and bf16 autocast on one with
    them. A run begun on one and resumed on the other continues with what its checkpoint
    recorded (prefopt_state.json), and says so."""
    from transformers import TrainerCallback

    class StopAfterOne(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    def config(**overrides):
        return TrainConfig(
            model=tiny_model_dir, data=[str(SAMPLES / "standard.jsonl")], output_dir=str(tmp_path / "run"),
            batch_size=2, max_length=64, max_steps=2, save_steps=1, **overrides,
        )  # fmt: skip

    monkeypatch.setenv(prec.UNITS_ENV, begun)
    first = train(config(), callbacks=[StopAfterOne()], save_final=False)
    state = json.loads((first.output_dir / "checkpoint-1" / "prefopt_state.json").read_text())
    expected = None if begun == "0" else "bfloat16"
    assert state["precision"] == {"weights": "float32", "autocast": expected}
    monkeypatch.setenv(prec.UNITS_ENV, resumed)
    capsys.readouterr()
    again = train(config(resume=True))
    assert again.steps == 2
    assert again.trainer.args.bf16 == (begun == "1")
    assert f"began with {expected or 'no'} autocast and continues with it" in capsys.readouterr().out
