"""CATS on CUDA: decode steps go through the Triton kernel and agree with the
torch path, float and int8 weights; a compiled decode step takes a new sparsity without recompiling."""

import pytest
import torch

from catsgen import cats, linear
from catsgen.bench import bench_thresholds
from catsgen.checkpoint import random_model
from catsgen.config import preset
from catsgen.generate import SamplingParams, generate, make_decode_step

# Run on a GPU machine: `python3 -m pytest tests_gpu` (CI has no GPU; tests/ holds the CPU suite).
assert torch.cuda.is_available(), "tests_gpu needs a CUDA GPU"


def calibrated_model(dtype, quantize="none"):
    model = random_model(preset("tiny"), "cuda", dtype, quantize=quantize)
    table = bench_thresholds(model, None, None, random_weights=True)
    return model, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("quantize,sparsity", [("none", 0.5), ("int8", 0.0), ("int8", 0.5)])
def test_kernel_path_matches_torch_path(dtype, tokens, quantize, sparsity):
    model, table = calibrated_model(dtype, quantize)
    cats.set_sparsity(model, table, sparsity)
    mlp, attention = model.mlps[0], model.layers[0].attention
    x = torch.randn(1, tokens, model.config.dim, device="cuda", dtype=dtype)
    threshold = getattr(mlp.activation, "threshold", None)
    with torch.no_grad():
        kernel, qkv = mlp(x), attention.wqkv(x)
        # an activate function forces the torch path
        keep = (lambda v: v) if threshold is None else (lambda v: torch.where(v.float().abs() > threshold, v, 0))
        reference = linear.mlp(x, mlp.w_gate, mlp.w_up, mlp.w_down_t, activate=keep)
        qkv_reference = x @ linear.float_weight(attention.wqkv.weight, dtype).t()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(kernel.float(), reference.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(qkv.float(), qkv_reference.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_compiled_int8_decode_matches_eager(sparsity):
    model, table = calibrated_model(torch.float32, "int8")
    model.setup_caches(1, 64)
    cats.set_sparsity(model, table, sparsity)
    prompt = list(range(10, 20))
    eager = generate(model, prompt, 12, SamplingParams(), decode_step=make_decode_step(False, "cuda")).tokens
    compiled = generate(model, prompt, 12, SamplingParams(), decode_step=make_decode_step(True, "cuda")).tokens
    assert compiled == eager


def test_compiled_decode_takes_a_new_sparsity_without_recompiling():
    from torch._dynamo.utils import counters
    model, table = calibrated_model(torch.bfloat16)
    model.setup_caches(1, 64)
    step = make_decode_step(True, "cuda")
    prompt = list(range(10, 20))
    outputs = {}
    for s in (0.5, 0.7, 0.5):
        cats.set_sparsity(model, table, s)
        if s == 0.7:
            graphs = counters["stats"]["unique_graphs"]
        outputs.setdefault(s, []).append(generate(model, prompt, 12, SamplingParams(), decode_step=step).tokens)
    assert counters["stats"]["unique_graphs"] == graphs
    assert outputs[0.5][0] == outputs[0.5][1]  # the threshold really went back to 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize,sparsity", [("none", 0.0), ("none", 0.5), ("int8", 0.0), ("int8", 0.5)])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_on_kernels_matches_the_torch_path(monkeypatch, dtype, quantize, sparsity, batch):
    """The whole decode step on the kernels (norms folded into the GEMV / CATS launches, W_o's
    residual in its epilogue, RoPE and the cache write in attention) against the torch path of the
    same model (no kernel: KERNEL_MAX_TOKENS 0, SDPA attention), logits over several steps."""
    from catsgen.model import Attention
    model, table = calibrated_model(dtype, quantize)
    cats.set_sparsity(model, table, sparsity)
    ids = torch.randint(0, model.config.vocab_size, (batch, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def run():
        model.setup_caches(batch, 64)
        with torch.no_grad():
            steps = [model(ids[:, :8], torch.arange(8, device="cuda"))[:, -1]]
            steps += [model(ids[:, t:t + 1], torch.tensor([t], device="cuda"))[:, -1] for t in range(8, 16)]
        return torch.stack(steps).float()

    kernels = run()
    monkeypatch.setattr(linear, "KERNEL_MAX_TOKENS", 0)
    monkeypatch.setattr(Attention, "decode_kernel", False)
    torch_path = run()
    err = ((kernels - torch_path).norm() / torch_path.norm()).item()
    assert err < (1e-4 if dtype == torch.float32 else 3e-2), err
