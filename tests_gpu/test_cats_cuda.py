"""CATS on CUDA: decode steps go through the Triton kernel and agree with the
torch path; a compiled decode step takes a new sparsity without recompiling."""

import pytest
import torch

from catsgen import cats
from catsgen.bench import bench_thresholds
from catsgen.checkpoint import random_model
from catsgen.config import preset
from catsgen.generate import SamplingParams, generate, make_decode_step

# Run on a GPU machine: `python3 -m pytest tests_gpu` (CI has no GPU; tests/ holds the CPU suite).
assert torch.cuda.is_available(), "tests_gpu needs a CUDA GPU"


def calibrated_model(dtype):
    model = random_model(preset("tiny"), "cuda", dtype)
    table = bench_thresholds(model, None, None, random_weights=True)
    return model, table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_kernel_path_matches_torch_path(dtype, tokens):
    model, table = calibrated_model(dtype)
    cats.set_sparsity(model, table, 0.5)
    mlp = model.mlps[0]
    x = torch.randn(1, tokens, model.config.dim, device="cuda", dtype=dtype)
    with torch.no_grad():
        kernel = mlp(x)
        with cats.counting(model, cats.SparsityCounter(model.config.n_layers, 0.5)):  # forces torch
            reference = mlp(x)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(kernel.float(), reference.float(), rtol=tol, atol=tol)


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
