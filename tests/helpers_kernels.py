"""Helpers shared by the CATS MLP kernel tests (bf16 and int8 weights)."""
import dataclasses
import importlib

import pytest
import torch

cm = importlib.import_module("catsgen.kernels.cats_mlp")  # the kernel's module, not the op of the same name
SMALL = cm.Blocks(gate_f=16, gate_d=32, up_r=16, up_d=16, up_steps=2, down_r=16, down_d=16, down_steps=2)  # many steps, tails
SMALL_FMA = dataclasses.replace(SMALL, fma_at_b1=True)  # B = 1 on the FMA units (B > 1: tl.dot as SMALL)
# fp32 inputs, int8 weights: one token on the FMA units converts int8 with an offset of 2^15 + 128
# (tiles.int8_to_f32_offset) taken off each run of products: ~1e-4 of rounding, far below int8's ~1e-2
INT8_F32_TOL = 3e-4


def threshold(x, w_gate, sparsity):
    """Scalar threshold that zeroes a `sparsity` fraction of |SiLU(W_gate x)| (0: none, 1: all)."""
    if sparsity == 0:
        return torch.tensor(-1.0, device=x.device)
    if sparsity == 1:
        return torch.tensor(float("inf"), device=x.device)
    v = torch.nn.functional.silu(x.float() @ w_gate.float().t()).abs().flatten().sort().values
    k = round(sparsity * v.numel())
    # halfway between two values, so rounding differences cannot flip the neuron at t
    return ((v[k - 1] + v[k]) / 2).to(torch.float32)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.fixture
def poisoned_scratch(monkeypatch):
    """Every scratch buffer the kernels get starts as NaN (float) or -1 (the int32 row list)."""
    poison = lambda *a, dtype, **k: torch.full(a, float("nan") if dtype.is_floating_point else -1, dtype=dtype, **k)  # noqa: E731
    monkeypatch.setattr(cm, "_empty", poison)
