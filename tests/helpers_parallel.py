"""What the tensor-parallel tests run in each rank (spawned processes import it by name), and
the same measurements in one process for the reference."""

from __future__ import annotations

import os
import traceback

import torch

NEW_TOKENS = 8
MAX_SEQ_LEN = 64


@torch.no_grad()
def measure(model, prompt: list[int], thresholds: dict) -> dict:
    """label -> (logits of a plain forward over the prompt, greedy tokens through the KV cache,
    the measured sparsity per layer (CATS only)), dense (None) and with each set of CATS
    thresholds (a list per layer: floats or [F] vectors)."""
    from catsgen.cats import SparsityCounter, measure_sparsity, set_dense, set_thresholds
    from catsgen.generate import generate
    model.setup_caches(1, MAX_SEQ_LEN)
    results = {}
    for label, per_layer in thresholds.items():
        if per_layer is None:
            set_dense(model)
        else:
            set_thresholds(model, per_layer)
        idx = torch.tensor([prompt])
        logits = model(idx)
        sparsity = None
        if per_layer is not None:
            sparsity = measure_sparsity(model, idx, SparsityCounter(model.config.n_layers, 0.5)).per_layer()
        results[label] = (logits, generate(model, prompt, NEW_TOKENS).tokens[0], sparsity)
    return results


def worker(rank: int, world: int, port: int, cases: dict, out_path: str):
    """One rank: the measurements for every case, then the failure paths. Rank 0 saves them."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from catsgen import parallel
    from catsgen.errors import UserError
    parallel.init("cpu", timeout_s=60)
    out = {}
    for name, (directory, prompt, thresholds) in cases.items():
        model = parallel.load_shard(directory, "cpu", torch.float32)
        out[name] = measure(model, prompt, thresholds)
    # A failure on rank 1 alone reaches every rank as one error naming it.
    def fails_on_rank1():
        if rank == 1:
            raise UserError("only here")

    try:
        parallel.agree(fails_on_rank1)
    except UserError as e:
        out["agree_error"] = str(e)
    if rank == 0:
        torch.save(out, out_path)
    # A rank that dies: the other's next all-reduce fails (rank 0 exits non-zero), no hang.
    if rank == 1:
        os._exit(3)
    try:
        parallel.ShardPlan(0, world, 1, 1, 1, 1).reduce(torch.ones(4)) + 0
    except Exception:  # gloo: the peer closed the connection
        traceback.print_exc()
        os._exit(4)
    os._exit(0)
