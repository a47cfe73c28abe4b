"""A GGUF file's metadata and tensors, checked, dequantized and given HF names and row order.

`import gguf` below is the PyPI package (absolute imports: this package's own name does not shadow it).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from catsgen.checkpoint import expected_hf_names
from catsgen.errors import UserError

# Llama 3.1+ files keep their RoPE scaling as this tensor; it is no weight (see hf_config.py).
ROPE_FREQS = "rope_freqs.weight"

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if not a Llama tensor."""
    parts = gguf_name.split(".")
    if parts[-1] != "weight":
        return None
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.weight"
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[parts[0]]}.weight"
    return None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `permute`).

    HF rotates pairs (i, i + head_dim/2) of each head; llama.cpp rotates adjacent pairs (2i, 2i+1), so
    its converter interleaves the two halves of every head's rows. Reading rows as
    (head, i, half) and swapping to (head, half, i) puts them back. `n_heads` is the number of heads
    the tensor holds (the KV heads for k_proj).
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of rotary pairs")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def open_gguf(path: Path):
    """(gguf.GGUFReader, metadata as plain Python values) of a Llama-architecture file whose
    tensors all have a place in an HF Llama and can be dequantized: found before any slow work."""
    import gguf

    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a GGUF file")
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: is not a regular file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct errors, ... on anything not GGUF
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a readable GGUF file ({reason})") from None
    # contents() turns each field into a Python value (str, int, float, bool or list).
    meta = {name: field.contents() for name, field in reader.fields.items()}
    _check_model(path, reader, meta)
    return reader, meta


@functools.cache
def _can_dequantize(qtype) -> bool:
    """Ask gguf.quants itself, on one all-zero block, rather than keeping our own list of types."""
    import gguf

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _check_model(path: Path, reader, meta: dict) -> None:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r} is not supported (only 'llama': Llama, Mistral, SmolLM ...)")
    for t in reader.tensors:
        if hf_tensor_name(t.name) is None and t.name != ROPE_FREQS:
            raise UserError(f"{path}: tensor {t.name!r} has no place in a Llama model "
                            "(MoE and biases are not supported)")
        if not _can_dequantize(t.tensor_type):
            raise UserError(f"{path}: tensor {t.name} is {t.tensor_type.name}, "
                            "which the gguf package cannot dequantize")


def hf_shapes(path: Path, reader, meta: dict) -> dict[str, tuple[int, ...]]:
    """HF name -> HF shape of every weight, after checking that the file holds exactly the tensors
    of an HF Llama with llama.block_count layers (tied when it has no output.weight)."""
    shapes = {hf_tensor_name(t.name): tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
              for t in reader.tensors if t.name != ROPE_FREQS}
    n_layers = int(meta.get("llama.block_count", 0))
    expected = expected_hf_names(n_layers, tied="lm_head.weight" not in shapes)
    if missing := expected - shapes.keys():
        split = " (a split GGUF: merge its parts with llama-gguf-split --merge)" if "split.count" in meta else ""
        raise UserError(f"{path}: {len(missing)} tensors are missing, e.g. {min(missing)}{split}")
    if extra := shapes.keys() - expected:
        raise UserError(f"{path}: tensor {min(extra)} is beyond llama.block_count={n_layers}")
    return shapes


def read_tensor(t) -> torch.Tensor:
    """One GGUF tensor as a float32 tensor of HF shape, in the file's row order."""
    import gguf

    w = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape))
    return torch.from_numpy(np.array(w, dtype=np.float32)).reshape(shape)  # a copy: reader data is a read-only memmap


def hf_weights(reader, n_heads: int, n_kv_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 weight in HF row order) for every weight, one at a time (dequantizing is the slow part)."""
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        w = read_tensor(t)
        if ".attn_q." in t.name:
            w = unpermute_rope_rows(w, n_heads)
        elif ".attn_k." in t.name:
            w = unpermute_rope_rows(w, n_kv_heads)
        yield hf_tensor_name(t.name), w
