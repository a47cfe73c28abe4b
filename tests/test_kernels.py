"""CATS MLP kernels: the Triton path (run on CPU by Triton's interpreter) against the torch
reference, and the reference against an independently written masked dense MLP."""
import dataclasses
import importlib
import os

import pytest
import torch

from catsgen.kernels import cats_mlp, cats_mlp_reference
from helpers_kernels import SMALL, SMALL_FMA, poisoned_scratch, rel_err, threshold  # noqa: F401 (poisoned_scratch: a fixture)

# White-box: the kernel's module (tiles, scratch allocator, workspace), not the op of the same name.
cm = importlib.import_module("catsgen.kernels.cats_mlp")

# conftest.py chooses Triton's interpreter on machines without CUDA, before triton is imported.
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _inputs(B, d, f, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = r(B, d)
    w_gate, w_up, w_down_t = r(f, d) / d**0.5, r(f, d) / d**0.5, r(f, d) / f**0.5
    return [t.to(DEV, dtype) for t in (x, w_gate, w_up, w_down_t)]


@pytest.mark.parametrize("fold", [1, 4, 3])  # 3 does not divide the 16 rows: the full accumulator
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_down_fold_matches_reference(poisoned_scratch, dtype, fold):
    """One token's down launch with each step's rows summed into a [fold, columns] accumulator."""
    x, w_gate, w_up, w_down_t = _inputs(1, 72, 150, dtype, seed=fold)
    t = threshold(x, w_gate, 0.5)
    out = cm.cats_mlp_triton(x, w_gate, w_up, w_down_t, t, blocks=dataclasses.replace(SMALL_FMA, down_fold=fold))
    assert rel_err(out, cats_mlp_reference(x, w_gate, w_up, w_down_t, t)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("sparsity", [0, 0.5, 1])
@pytest.mark.parametrize("d,f,blocks", [(37, 67, None), (72, 150, SMALL), (64, 150, SMALL_FMA), (72, 150, SMALL_FMA)])
def test_triton_matches_reference(poisoned_scratch, dtype, B, sparsity, d, f, blocks):
    seed = int(torch.randint(2**31, ()))
    x, w_gate, w_up, w_down_t = _inputs(B, d, f, dtype, seed)
    t = threshold(x, w_gate, sparsity)
    out = cm.cats_mlp_triton(x, w_gate, w_up, w_down_t, t, blocks=blocks)
    ref = cats_mlp_reference(x, w_gate, w_up, w_down_t, t)
    assert out.shape == (B, d) and out.dtype == dtype
    assert not out.isnan().any(), f"unwritten output (seed {seed})"
    if sparsity == 1:
        assert (out == 0).all()
    else:
        assert rel_err(out, ref) < TOL[dtype], f"seed {seed}"


@pytest.mark.parametrize("B", [1, 3])
def test_inactive_rows_are_never_read(B):
    """NaN in the up/down rows of neurons no token needs must not reach y: those rows are skipped."""
    d, f = 40, 96
    x, w_gate, w_up, w_down_t = _inputs(B, d, f, torch.float32, seed=B)
    t = threshold(x, w_gate, 0.6)
    ref = cats_mlp_reference(x, w_gate, w_up, w_down_t, t)
    v = torch.nn.functional.silu(x @ w_gate.t())
    idle = ~(v.abs() > t).any(0)
    assert 0 < idle.sum() < f
    w_up[idle], w_down_t[idle] = float("nan"), float("nan")
    for blocks in (None, SMALL):
        out = cm.cats_mlp_triton(x, w_gate, w_up, w_down_t, t, blocks=blocks)
        assert rel_err(out, ref) < 1e-5


def test_list_counter_is_left_at_zero():
    """The row list's counter is a workspace kept across calls with no memset: every call must
    leave it at zero, or the next call would append after a stale list."""
    x, w_gate, w_up, w_down_t = _inputs(2, 40, 96, torch.float32, seed=5)
    outputs = []
    for sparsity in (0.3, 0.8, 0.3):
        t = threshold(x, w_gate, sparsity)
        outputs.append(cm.cats_mlp_triton(x, w_gate, w_up, w_down_t, t, blocks=SMALL))
        assert cm.list_counter(x.device)[0].item() == 0
        assert rel_err(outputs[-1], cats_mlp_reference(x, w_gate, w_up, w_down_t, t)) < 1e-5
    assert torch.equal(outputs[0], outputs[2]) or rel_err(outputs[0], outputs[2]) < 1e-6


def test_per_neuronthreshold():
    d, f, B = 37, 67, 2
    x, w_gate, w_up, w_down_t = _inputs(B, d, f, torch.float32, seed=1)
    t = torch.rand(f, device=DEV) * 0.5
    out = cats_mlp(x, w_gate, w_up, w_down_t, t, use_triton=True)
    assert rel_err(out, cats_mlp_reference(x, w_gate, w_up, w_down_t, t)) < 1e-5


def test_reference_is_masked_dense_mlp():
    """The reference against the CATS definition written out per token, in float64."""
    d, f, B = 24, 50, 3
    x, w_gate, w_up, w_down_t = (a.double().cpu() for a in _inputs(B, d, f, torch.float32, seed=2))
    t = 0.3
    y = torch.zeros(B, d, dtype=torch.float64)
    for b in range(B):
        gate = w_gate @ x[b]
        act = gate / (1 + torch.exp(-gate))
        keep = (act.abs() > t).double()
        y[b] = torch.einsum("fd,f->d", w_down_t, keep * act * (w_up @ x[b]))
    ref = cats_mlp_reference(x.float(), w_gate.float(), w_up.float(), w_down_t.float(), torch.tensor(t))
    assert rel_err(ref, y) < 1e-5


def test_custom_op_under_torch_compile():
    """The custom op (reference on CPU, Triton on CUDA) inside a fullgraph-compiled step."""
    d, f, B = 37, 67, 1
    x, w_gate, w_up, w_down_t = _inputs(B, d, f, torch.float32, seed=3)
    t = threshold(x, w_gate, 0.5)
    step = lambda x, t: x + cats_mlp(x * 2, w_gate, w_up, w_down_t, t)  # noqa: E731
    # aot_eager traces with fake tensors (what checks the registration) without inductor's C++ build
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # a second threshold value must not need a new graph
        out = compiled(x, t)
        assert rel_err(out, x + cats_mlp_reference(x * 2, w_gate, w_up, w_down_t, t)) < 1e-5
        t = t * 0.5
    torch.library.opcheck(torch.ops.catsgen.cats_mlp.default, (x, w_gate, w_up, w_down_t, t))


def test_setup_caches_prepares_the_workspaces(monkeypatch):
    """The kernels' workspaces are made, zeroed, when the model sets up its caches (so before any
    CUDA-graph capture), and a second set-up keeps the same tensors (a captured graph holds them)."""
    from catsgen.config import preset
    from catsgen.model import Transformer
    registry = importlib.import_module("catsgen.kernels.workspace")
    monkeypatch.setattr(registry, "_workspaces", {})
    model = Transformer(preset("tiny"))
    model.setup_caches(batch_size=3, max_seq_len=16)
    made = dict(registry._workspaces)
    assert sorted(name for name, _ in made) == ["cats_mlp_list", "decode_attention_arrivals"]
    assert all(t.dtype == torch.int32 and not t.any() for t in made.values())
    assert made["decode_attention_arrivals", torch.device("cpu")].numel() >= 3 * preset("tiny").n_kv_heads
    model.setup_caches(batch_size=3, max_seq_len=16)
    assert all(registry._workspaces[key] is t for key, t in made.items())
