"""Decode kernels (shipped as catsgen.kernels): the one door the model uses.

Layout rule: one file per kernel, holding
  - its torch reference (the definition the kernel must match; also the op's CPU path),
  - its Triton code, defined only when triton imports (`if triton is not None:`), so CPU-only
    machines without Triton still import this package and run the reference,
  - its torch.library custom op `catsgen::<name>` (a plain @custom_op decorator, no
    re-registration guard) with a register_fake, so a decode step compiles with fullgraph=True
    and runs under CUDA graphs,
  - its public function `<name>(..., use_triton=None)`: the op by default, True / False force
    the Triton path / the reference,
  - the accessor of any workspace it keeps across calls (built on workspace.int32_workspace),
    which prepare_workspaces below creates.
Callers import from here only; tests and GPU scripts may reach into a kernel's module for its
tiles and Triton path (importlib.import_module: the module and its op share a name).
Shared Triton pieces, no op of their own: tiles.py (the weight-tile loops), to_f32.py (weights to
fp32 in registers), down1.py (cats_mlp's one-token down launches); mlp_tiles.py holds cats_mlp's
tile sizes (Blocks) and their tuned tables.
"""
from .cats_mlp import cats_mlp, cats_mlp_reference, list_counter, rms_norm_reference
from .decode_attention import (arrival_counters, decode_attention, decode_attention_reference, decode_attention_rope,
                               decode_attention_rope_reference, split_heads)
from .gemv import gemv, gemv_reference, int8_gemv, int8_gemv_reference

__all__ = ["cats_mlp", "cats_mlp_reference", "rms_norm_reference", "decode_attention", "decode_attention_reference",
           "decode_attention_rope", "decode_attention_rope_reference", "split_heads",
           "gemv", "gemv_reference", "int8_gemv", "int8_gemv_reference", "prepare_workspaces"]


def prepare_workspaces(device, batch_size: int, n_kv_heads: int) -> None:
    """Make the kernels' zeroed workspaces on `device` for a KV cache of batch_size sequences x
    n_kv_heads. Call once when the caches are set up, before any CUDA-graph capture: a workspace
    made inside torch.compile's capture would live in the graph's private memory pool."""
    list_counter(device)
    arrival_counters(device, batch_size * n_kv_heads)
