"""Tensor parallelism over torch.distributed (Megatron-style, as gpt-fast's tp.py).

Each rank owns a contiguous slice of the query heads, of the KV heads and of the MLP's neurons:
its slice of W_q/W_k/W_v rows, the matching W_o columns, its W_gate/W_up rows and W_down
columns (rows of W_down^T), its own KV cache. Attention and the MLP then each end in a partial
sum over the rank's slice, and one all-reduce per block (after W_o, after W_down) makes it whole.
CATS needs nothing more: a rank thresholds and skips its own neurons.
Embeddings, norms and the LM head are replicated: every rank computes the same logits and so
samples the same token (same seed), and no rank ever needs another's tokens.

The all-reduce is a functional collective (torch.distributed._functional_collectives), which
torch.compile traces into the decode step's graph, so it runs inside CUDA graphs.
Ranks come from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from catsgen.config import ModelConfig
from catsgen.errors import UserError

# A collective waiting longer than this fails (no hang when a peer died without torchrun to
# stop the rest). Generous: ranks compiling the decode step reach its first all-reduce apart.
DEFAULT_TIMEOUT_S = float(os.environ.get("CATSGEN_DIST_TIMEOUT_S", 600))

# HF weight name inside a layer -> (dimension of the HF tensor that is split, the ShardPlan
# field holding this rank's size along it).
_SPLITS = {
    "self_attn.q_proj.weight": (0, "q_size"),
    "self_attn.k_proj.weight": (0, "kv_size"),
    "self_attn.v_proj.weight": (0, "kv_size"),
    "self_attn.o_proj.weight": (1, "q_size"),
    "mlp.gate_proj.weight": (0, "neurons"),
    "mlp.up_proj.weight": (0, "neurons"),
    "mlp.down_proj.weight": (1, "neurons"),
}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or no torchrun): the one process that prints."""
    return rank() == 0


@dataclass(frozen=True)
class ShardPlan:
    """What this rank owns: n_heads query heads, n_kv_heads KV heads and `neurons` MLP neurons,
    each the rank-th of `world` equal contiguous slices."""
    rank: int
    world: int
    n_heads: int
    n_kv_heads: int
    neurons: int
    head_dim: int

    @classmethod
    def make(cls, config: ModelConfig, rank: int = 0, world: int = 1) -> "ShardPlan":
        check_divisible(config, world)
        return cls(rank, world, config.n_heads // world, config.n_kv_heads // world,
                   config.intermediate_size // world, config.head_dim)

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def split(self, layer_name: str) -> tuple[int, int, int] | None:
        """For an HF weight name inside a layer: (dim, start, stop) of this rank's part, or None
        for a tensor every rank holds whole."""
        if self.world == 1 or layer_name not in _SPLITS:
            return None
        dim, field = _SPLITS[layer_name]
        size = getattr(self, field)
        return dim, self.rank * size, (self.rank + 1) * size

    def local_thresholds(self, threshold: torch.Tensor) -> torch.Tensor:
        """A per-layer threshold (0-d) applies unchanged; a per-neuron [F] vector is cut to this
        rank's neurons."""
        if threshold.dim() == 0 or self.world == 1:
            return threshold
        return threshold[self.rank * self.neurons:(self.rank + 1) * self.neurons]

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial output (identity on one rank)."""
        if self.world == 1:
            return partial
        import torch.distributed._functional_collectives as funcol
        return funcol.all_reduce(partial, "sum", dist.group.WORLD)


def check_divisible(config: ModelConfig, world: int):
    """Every rank must get whole KV heads (and so whole query groups) and equal neuron slices."""
    if world < 1:
        raise UserError(f"world size {world} must be at least 1")
    if config.n_kv_heads % world or config.intermediate_size % world:
        common = math.gcd(config.n_kv_heads, config.intermediate_size)
        works = [str(n) for n in range(1, common + 1) if common % n == 0]
        raise UserError(f"cannot shard over {world} ranks: num_key_value_heads ({config.n_kv_heads}) and "
                        f"intermediate_size ({config.intermediate_size}) must both be divisible by it "
                        f"(ranks that work: {', '.join(works)})")


def init(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA); returns the
    device this rank runs on (cuda:LOCAL_RANK on CUDA). Silences other ranks' stdout and logging."""
    if world_size() == 1:
        return device
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        per_host, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world_size())), torch.cuda.device_count()
        if per_host > gpus:  # the same test on every rank: they all stop, rank 0 says why
            raise UserError(f"{per_host} ranks on this host but {gpus} GPUs visible: "
                            f"use --nproc-per-node <= {gpus}")
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    silence_other_ranks()
    return device


def silence_other_ranks():
    """Only rank 0 prints: the others' stdout goes nowhere and their logging is off (a crash's
    traceback still reaches stderr)."""
    if not is_main():
        logging.disable(logging.CRITICAL)
        sys.stdout = open(os.devnull, "w")


def distributed() -> bool:
    """Whether this process is one of several ranks of a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def plan_for(config: ModelConfig) -> ShardPlan:
    """This process's plan: from the process group when one is up, else the whole model."""
    if distributed():
        return ShardPlan.make(config, dist.get_rank(), dist.get_world_size())
    return ShardPlan.make(config)


def load_shard(checkpoint, device, dtype, quantize: str = "none"):
    """This process's share of a checkpoint (the whole model without a process group): shapes
    checked on every rank alike, then each rank reads its own slices; a failure on any rank
    fails every rank with one message."""
    from catsgen.checkpoint import load_model
    config = ModelConfig.from_checkpoint(checkpoint)
    return agree(load_model, checkpoint, device=device, dtype=dtype, config=config, plan=plan_for(config),
                 quantize=quantize)


def agree(fn, *args, **kwargs):
    """Run fn (work that can fail on one rank alone, like reading its slices) on every rank, then
    fail on every rank if it failed on any: a one-line UserError naming the first failing rank,
    instead of the others waiting forever at their next collective. One process: just fn."""
    if not distributed():
        return fn(*args, **kwargs)
    error = None
    try:
        result = fn(*args, **kwargs)
    except (UserError, OSError, torch.OutOfMemoryError) as e:
        error, result = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}", None
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, e = failed[0]
        raise UserError(f"rank {r}: {e}")
    return result


def first_on_rank0(fn, *args, **kwargs):
    """fn on rank 0, then on the others: for work that fills a cache (converting or calibrating
    the default model), so the others find it done instead of racing to write it."""
    first = agree(fn, *args, **kwargs) if is_main() else agree(_nothing)
    later = agree(_nothing) if is_main() else agree(fn, *args, **kwargs)
    return first if is_main() else later


def _nothing():
    return None


def sum_over_ranks(values: list) -> list[float]:
    """Element-wise sums over the ranks (counts each rank made over its own neurons)."""
    if not distributed():
        return values
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    summed = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def merge_counts(counter):
    """A SparsityCounter that each rank filled over its own neurons, made the whole model's."""
    counter.zeroed, counter.total = sum_over_ranks(counter.zeroed), sum_over_ranks(counter.total)
    return counter


def time_all_reduce(shape, dtype, device, iters: int = 200) -> float:
    """Seconds per all-reduce of one tensor of this shape (0 on one rank), timed alone in a loop;
    on CUDA replayed from a CUDA graph, as the compiled decode step runs it."""
    if not distributed():
        return 0.0
    x = torch.zeros(shape, dtype=dtype, device=device)
    on_cuda = x.is_cuda

    def loop():
        for _ in range(iters):
            dist.all_reduce(x)

    loop()  # warm-up: the communicator is set up outside any capture
    if on_cuda:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop()
        loop = graph.replay
        loop()
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    loop()
    if on_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def shutdown():
    """Leave the process group (at the end of a command that ran sharded)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave():
    """At the end of a command (in its `finally`): leave the process group; a rank of several
    then exits at once (exit_rank)."""
    shutdown()
    if world_size() > 1:
        exit_rank()


def exit_rank():
    """End a torchrun rank now, with the exit code of the exception in flight (SystemExit from
    typer or above; anything else is printed and gives 1). Even after destroy_process_group, the
    interpreter's own exit aborted about 1 rank run in 5 on a loaded 2-core machine (SIGABRT
    from a C++ thread torn down during finalization, with no Python frame left: a PyTorch/gloo
    issue, reproduced with eager functional collectives alone), so a rank skips finalization:
    its streams flushed, then os._exit. Every output file is written and closed by then."""
    error = sys.exc_info()[1]
    if isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
        if isinstance(error.code, str):
            print(error.code, file=sys.stderr)
    elif error is not None:
        traceback.print_exc()
        code = 1
    else:
        code = 0
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
