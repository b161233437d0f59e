"""Contiguous gradients and Adam moments (prefopt.buffers): bit-identical training, one block each."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.buffers import ContiguousBuffers

from .test_losses_end_to_end import run


def _three_layers():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1, fused=True),
        lambda ps: torch.optim.Adam(ps, lr=0.1, amsgrad=True, foreach=True),
    ],
    ids=["adamw", "adamw-fused", "adam-amsgrad-foreach"],
)
def test_same_steps_as_lazy_state_and_fresh_gradients(make_optimizer):
    """Three steps where the last layer never gets a gradient: every parameter and every state
    tensor equals the plain run's bit for bit, and the untouched layer is skipped (grad None before
    the step, as zero_grad(set_to_none=True) leaves it; AdamW would otherwise decay its weights)."""
    plain, flat = _three_layers(), _three_layers()
    plain_opt, flat_opt = make_optimizer(plain.parameters()), make_optimizer(flat.parameters())
    buffers = ContiguousBuffers(flat.parameters())
    untouched = list(flat[2].parameters())
    for _ in range(3):
        x = torch.randn(5, 4)
        plain[:2](x).pow(2).sum().backward()
        plain_opt.step()
        plain.zero_grad()

        buffers.attach_gradients()
        assert buffers.adopt_optimizer_state(flat_opt) == (_ == 0)
        flat[:2](x).pow(2).sum().backward()
        buffers.release_untouched()
        assert all(p.grad is None for p in untouched)
        flat_opt.step()
        flat.zero_grad()
    for p, q in zip(plain.parameters(), flat.parameters(), strict=True):
        assert torch.equal(p, q)
        assert set(plain_opt.state.get(p, {})) <= set(flat_opt.state[q])
        for key, value in plain_opt.state.get(p, {}).items():
            assert value.dtype == flat_opt.state[q][key].dtype
            assert torch.equal(value, flat_opt.state[q][key])
    # the moments of all parameters live in one block
    storages = {flat_opt.state[q]["exp_avg"].untyped_storage().data_ptr() for q in flat.parameters()}
    assert len(storages) == 1
    buffers.close()


def test_gradients_are_views_of_one_block_and_accumulate():
    model = _three_layers()
    buffers = ContiguousBuffers(model.parameters())
    buffers.attach_gradients()
    x = torch.randn(5, 4)
    model(x).sum().backward()
    once = [p.grad.clone() for p in model.parameters()]
    model(x).sum().backward()  # accumulation adds into the same views
    for p, g in zip(model.parameters(), once, strict=True):
        assert torch.allclose(p.grad, 2 * g)
    assert len({p.grad.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    # a gradient dropped (as GradientGuard does with a NaN one) comes back zeroed
    for p in model.parameters():
        p.grad.fill_(float("nan"))
        p.grad = None
    buffers.attach_gradients()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    buffers.close()


def test_a_loaded_or_other_optimizer_state_is_left_alone():
    model = _three_layers()
    buffers = ContiguousBuffers(model.parameters())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert not buffers.adopt_optimizer_state(sgd)
    adamw = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    adamw.step()  # state exists, as after loading a checkpoint on resume
    before = {id(v) for s in adamw.state.values() for v in s.values()}
    assert not buffers.adopt_optimizer_state(adamw)
    assert {id(v) for s in adamw.state.values() for v in s.values()} == before
    buffers.close()


@pytest.mark.parametrize("overrides", [{}, {"grad_accum": 2, "batch_size": 1}, {"lora": True}], ids=str)
def test_training_with_contiguous_buffers_is_bit_identical(tmp_path, tiny_model_dir, overrides):
    results = {}
    for on in (True, False):
        result = run(tmp_path / str(on), tiny_model_dir, contiguous_buffers=on, weight_decay=0.1, **overrides)
        results[on] = load_file(
            Path(result.output_dir)
            / "final"
            / next(
                n
                for n in ("model.safetensors", "adapter_model.safetensors")
                if (Path(result.output_dir) / "final" / n).exists()
            )
        )
        if on:
            optimizer = result.trainer.optimizer
            raw = getattr(optimizer, "optimizer", optimizer)
            moments = [s["exp_avg"] for s in raw.state.values()]
            groups = [g for g in raw.param_groups if g["params"]]  # transformers: with and without decay
            assert moments and len({m.untyped_storage().data_ptr() for m in moments}) == len(groups)
        else:
            assert result.trainer.buffers is None
    assert results[True].keys() == results[False].keys()
    for name, tensor in results[True].items():
        assert torch.equal(tensor, results[False][name]), name
