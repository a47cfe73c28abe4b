"""HF safetensors checkpoints (single file or sharded) -> Transformer weights, laid out once at load.

Layout transforms: q/k/v are fused into one matrix (one GEMV per layer at decode), and
W_down is stored transposed ([f, d]) so a neuron CATS skips is one contiguous row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from catsgen.config import ModelConfig
from catsgen.errors import UserError
from catsgen.model import Transformer
from catsgen.parallel import ShardPlan

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# HF name inside a layer -> our name inside a layer.
_LAYER_NAMES = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w_gate",
    "mlp.up_proj.weight": "feed_forward.w_up",
    "mlp.down_proj.weight": "feed_forward.w_down_t",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_GLOBAL_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight",
                 "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
# Buffers some older checkpoints carry; recomputed here, so ignored.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r} (choose from: {', '.join(DTYPES)})")
    return DTYPES[name]


def checkpoint_files(checkpoint_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single model.safetensors."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index} is not a valid safetensors index ({e})") from None
        return {name: checkpoint_dir / file for name, file in weight_map.items()}
    single = checkpoint_dir / "model.safetensors"
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    if any(checkpoint_dir.glob("*.bin")) or any(checkpoint_dir.glob("*.pth")):
        raise UserError(f"{checkpoint_dir} holds only pickle weights (.bin/.pth); catsgen reads "
                        "safetensors only (re-save with save_pretrained(safe_serialization=True))")
    raise UserError(f"{checkpoint_dir} has no model.safetensors or model.safetensors.index.json")


def _tensor_names(file: Path) -> list[str]:
    with _open(file) as f:
        return list(f.keys())


def _open(file: Path):
    if not file.is_file():
        raise UserError(f"safetensors file {file} is missing")
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({e})") from None


def _target_name(hf_name: str) -> str | None:
    """Our parameter name for an HF tensor name; None for q/k/v (fused separately)."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = _LAYER.fullmatch(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def expected_hf_names(config: ModelConfig) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(config.n_layers):
        names.update(f"model.layers.{i}.{n}" for n in (*_LAYER_NAMES, *_QKV))
    return names


class _TensorReader:
    """Reads tensors by HF name from whichever file holds them, opening each file once."""

    def __init__(self, files: dict[str, Path], plan: ShardPlan | None = None):
        self.files = files
        self.handles = {}
        self.plan = plan

    def get(self, name: str) -> torch.Tensor:
        """The tensor, or under tensor parallelism only this rank's slice of it (read alone)."""
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = _open(file)
        m = _LAYER.fullmatch(name)
        split = self.plan.split(m.group(2)) if self.plan is not None and m else None
        try:
            if split is None:
                return self.handles[file].get_tensor(name)
            return _read_slice(self.handles[file].get_slice(name), split, file, name, self.plan.world)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{file}: tensor {name} cannot be read ({e})") from None


def _read_slice(tensor_slice, split, file, name, world) -> torch.Tensor:
    """Rows or columns start:stop of a tensor, reading only those bytes. The slice's shape is
    checked later like a whole tensor's; here the whole length along the split dimension."""
    dim, start, stop = split
    shape = tensor_slice.get_shape()
    if len(shape) != 2 or shape[dim] != world * (stop - start):
        raise UserError(f"{file}: tensor {name} has shape {tuple(shape)}, expected dimension {dim} of "
                        f"{world * (stop - start)} from config.json")
    return tensor_slice[start:stop] if dim == 0 else tensor_slice[:, start:stop]


def load_model(checkpoint_dir: str | Path, device="cpu", dtype: torch.dtype | None = None,
               config: ModelConfig | None = None, plan: ShardPlan | None = None) -> Transformer:
    """Build the Transformer on the meta device and fill it tensor by tensor, so that peak
    memory is one model (plus one tensor), not two. plan: load only this rank's slices
    (tensor parallelism, catsgen/parallel.py)."""
    checkpoint_dir = Path(checkpoint_dir)
    config = config or ModelConfig.from_checkpoint(checkpoint_dir)
    dtype = dtype or DTYPES.get(config.torch_dtype, torch.bfloat16)
    files = checkpoint_files(checkpoint_dir)
    _check_names(config, files, checkpoint_dir)
    with torch.device("meta"):
        model = Transformer(config, plan)
    expected_shapes = {k: v.shape for k, v in model.state_dict().items()}
    reader = _TensorReader(files, plan)

    def place(name, tensor, source):
        if tuple(tensor.shape) != tuple(expected_shapes[name]):
            raise UserError(f"{files[source]}: tensor {source} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(expected_shapes[name])} from config.json")
        return tensor.to(device=device, dtype=dtype)

    state = {}
    for hf_name in sorted(files):
        target = _target_name(hf_name)
        if target is None:
            continue
        if target == "output.weight" and config.tie_word_embeddings:
            continue
        tensor = reader.get(hf_name)
        if target.endswith("w_down_t"):
            tensor = tensor.t()
        state[target] = place(target, tensor.contiguous(), hf_name)
    for i in range(config.n_layers):
        names = [f"model.layers.{i}.{n}" for n in _QKV]
        fused = torch.cat([reader.get(n).to(dtype) for n in names])
        state[f"layers.{i}.attention.wqkv.weight"] = place(f"layers.{i}.attention.wqkv.weight", fused, names[0])
    if config.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def _check_names(config: ModelConfig, files: dict[str, Path], checkpoint_dir: Path):
    expected = expected_hf_names(config)
    present = {n for n in files if not _IGNORED.fullmatch(n)}
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints still save it: same tensor
    missing = sorted(expected - present)
    if missing:
        raise UserError(f"{checkpoint_dir}: tensor {missing[0]} is missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(present - expected)
    if unexpected:
        raise UserError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]}"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))


def random_model(config: ModelConfig, device="cpu", dtype=torch.bfloat16, seed: int = 0,
                 plan: ShardPlan | None = None) -> Transformer:
    """A model with random weights at a real shape, built directly on the device (benchmarks).
    Under a plan every rank has the same shapes, hence the same random stream: the replicated
    weights (embeddings, norms, head) agree across ranks. Made on the meta device and then
    allocated in `dtype`: never a float32 copy (a 70B shard in float32 would not fit)."""
    with torch.device("meta"):
        model = Transformer(config, plan)
    model = model.to(dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return model.eval()
