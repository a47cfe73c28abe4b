"""HF safetensors checkpoints (single file or sharded) -> Transformer weights, laid out once at load.

Layout transforms: q/k/v are fused into one matrix (one GEMV per layer at decode), and
W_down is stored transposed ([f, d]) so a neuron CATS skips is one contiguous row.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from catsgen.config import ModelConfig, read_json_object
from catsgen.errors import UserError
from catsgen.linear import cpu_layout, decoder_linear_names, quantize_model, quantized, set_weight
from catsgen.model import Transformer
from catsgen.parallel import ShardPlan

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# safetensors header dtype -> name: the weight dtypes a checkpoint may hold (any other is a relabelling).
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}

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
        return {name: checkpoint_dir / file for name, file in _read_weight_map(index).items()}
    single = checkpoint_dir / "model.safetensors"
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    if any(checkpoint_dir.glob("*.bin")) or any(checkpoint_dir.glob("*.pth")):
        raise UserError(f"{checkpoint_dir} holds only pickle weights (.bin/.pth); catsgen reads "
                        "safetensors only (re-save with save_pretrained(safe_serialization=True))")
    raise UserError(f"{checkpoint_dir} has no model.safetensors or model.safetensors.index.json")


def _read_weight_map(index: Path) -> dict[str, str]:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and isinstance(file, str) for name, file in weight_map.items()):
        raise UserError(f"{index}: weight_map must be an object of tensor name -> shard file name")
    for file in set(weight_map.values()):
        if Path(file).is_absolute() or ".." in Path(file).parts:  # shards live beside the index
            raise UserError(f"{index}: shard {file!r} is outside the checkpoint directory")
    return weight_map


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


def expected_hf_names(n_layers: int, tied: bool) -> set[str]:
    """Every tensor an HF Llama checkpoint holds (also what a GGUF must convert into)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not tied:
        names.add("lm_head.weight")
    for i in range(n_layers):
        names.update(f"model.layers.{i}.{n}" for n in (*_LAYER_NAMES, *_QKV))
    return names


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> the shape config.json implies for it (the names: expected_hf_names)."""
    d, f, vocab = config.dim, config.intermediate_size, config.vocab_size
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, d)
    layer = {"self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
             "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
             "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
             "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    for i in range(config.n_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


class _TensorReader:
    """Reads tensors by HF name from whichever file holds them, opening each file once."""

    def __init__(self, files: dict[str, Path], plan: ShardPlan | None = None):
        self.files = files
        self.handles = {}
        self.plan = plan

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = _open(file)
        return self.handles[file]

    def get(self, name: str) -> torch.Tensor:
        """The tensor, or under tensor parallelism only this rank's slice of it (read alone)."""
        m = _LAYER.fullmatch(name)
        split = self.plan.split(m.group(2)) if self.plan is not None and m else None
        try:
            if split is None:
                return self._handle(name).get_tensor(name)
            return _read_slice(self._handle(name).get_slice(name), split, self.files[name], name, self.plan.world)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{self.files[name]}: tensor {name} cannot be read ({e})") from None

    def check_header(self, name: str, expected_shape: tuple[int, ...]):
        """Shape and dtype from the file's header, before any tensor is read, cast or fused."""
        try:
            header = self._handle(name).get_slice(name)
            shape, dtype = tuple(header.get_shape()), header.get_dtype()
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{self.files[name]}: tensor {name} cannot be read ({e})") from None
        if dtype not in FLOAT_DTYPES:
            raise UserError(f"{self.files[name]}: tensor {name} has dtype {dtype}; weights must be "
                            f"one of {', '.join(FLOAT_DTYPES.values())}")
        if shape != expected_shape:
            raise UserError(f"{self.files[name]}: tensor {name} has shape {shape}, "
                            f"expected {expected_shape} from config.json")


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
               config: ModelConfig | None = None, plan: ShardPlan | None = None,
               quantize: str = "none") -> Transformer:
    """Build the Transformer on the meta device and fill it tensor by tensor, so that peak
    memory is one model (plus one tensor), not two. plan: load only this rank's slices (tensor
    parallelism, catsgen/parallel.py). quantize="int8": each decoder linear is quantized as it is
    placed (catsgen/linear.py), its float copy freed at once."""
    checkpoint_dir = Path(checkpoint_dir)
    config = config or ModelConfig.from_checkpoint(checkpoint_dir)
    dtype = dtype or DTYPES.get(config.torch_dtype, torch.bfloat16)
    files = checkpoint_files(checkpoint_dir)
    shapes = _check_names(config, files, checkpoint_dir)
    reader = _TensorReader(files, plan)
    for name, shape in shapes.items():
        reader.check_header(name, shape)
    with torch.device("meta"):
        model = Transformer(config, plan)
    to_quantize = set(decoder_linear_names(config.n_layers)) if quantize == "int8" else set()
    model.quantize = quantize

    def put_int8(target, weight):  # weight [out, in] as the checkpoint stores it (W_down, not W_down^T)
        int8 = quantized(target, weight)
        set_weight(model, target, int8)
        state.update({f"{target}.{k}": v for k, v in int8.state_dict().items()})

    def place(tensor, source):
        converted = tensor.to(device=device, dtype=dtype)
        # Corrupt weights, or float32 values beyond float16's range, would only show as garbage text.
        if not torch.isfinite(converted).all():
            name = str(dtype).removeprefix("torch.")
            cause = ("NaN or inf" if not torch.isfinite(tensor).all()
                     else f"beyond {name}'s range: load it as bfloat16 or float32")
            raise UserError(f"{files[source]}: tensor {source} has non-finite values in {name} ({cause})")
        return converted

    state = {}
    for hf_name in sorted(files):
        target = _target_name(hf_name)
        if target is None:
            continue
        if target == "output.weight" and config.tie_word_embeddings:
            continue
        tensor = reader.get(hf_name)
        if target in to_quantize:
            put_int8(target, place(tensor, hf_name))
            continue
        if target.endswith("w_down_t"):
            tensor = tensor.t()
        state[target] = cpu_layout(target, place(tensor.contiguous(), hf_name))
    for i in range(config.n_layers):
        names = [f"model.layers.{i}.{n}" for n in _QKV]
        wqkv = torch.cat([place(reader.get(n), n) for n in names])
        target = f"layers.{i}.attention.wqkv.weight"
        if target in to_quantize:
            put_int8(target, wqkv)
        else:
            state[target] = cpu_layout(target, wqkv)
    if config.tie_word_embeddings:  # the LM head's layout wins: one GEMV a token against one row read
        state["output.weight"] = state["tok_embeddings.weight"] = cpu_layout("output.weight",
                                                                             state["tok_embeddings.weight"])
    model.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def _check_names(config: ModelConfig, files: dict[str, Path], checkpoint_dir: Path) -> dict[str, tuple]:
    """The expected shapes, once every expected tensor is known to be present and nothing else is."""
    layers = {int(m.group(1)) for name in files if (m := _LAYER.fullmatch(name))}
    held = max(layers) + 1 if layers else 0
    if held != config.n_layers:  # checked first: a huge num_hidden_layers would not even list its names
        raise UserError(f"{checkpoint_dir / 'config.json'}: num_hidden_layers is {config.n_layers} "
                        f"but the checkpoint holds tensors for {held} layers")
    expected = expected_hf_shapes(config)
    present = {n for n in files if not _IGNORED.fullmatch(n)}
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints still save it: same tensor
    missing = sorted(expected.keys() - present)
    if missing:
        raise UserError(f"{checkpoint_dir}: tensor {missing[0]} is missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(present - expected.keys())
    if unexpected:
        raise UserError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]}"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    return expected


def random_model(config: ModelConfig, device="cpu", dtype=torch.bfloat16, seed: int = 0,
                 plan: ShardPlan | None = None, quantize: str = "none") -> Transformer:
    """A model with random weights at a real shape, built directly on the device (benchmarks).
    Under a plan every rank has the same shapes, hence the same random stream: the replicated
    weights (embeddings, norms, head) agree across ranks. Made on the meta device and then
    allocated in `dtype`: never a float32 copy (a 70B shard in float32 would not fit).
    quantize="int8" then quantizes its decoder linears one by one."""
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
    if quantize == "int8":
        quantize_model(model)
    return model.eval()


def checkpoint_fingerprint(checkpoint_dir, samples: int = 64, sample_bytes: int = 64) -> str:
    """sha256 over each safetensors file's header (names, dtypes, shapes, offsets) and a few bytes
    sampled at evenly spaced offsets of its data. Reads a few KB, not the weights, and depends on
    the files only: not on the dtype or device the model is loaded with."""
    digest = hashlib.sha256()
    for file in sorted(set(checkpoint_files(Path(checkpoint_dir)).values())):
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(file.name.encode() + f.read(header_len))
            data_start, data_len = 8 + header_len, file.stat().st_size - 8 - header_len
            for i in range(samples):
                f.seek(data_start + data_len * i // samples)
                digest.update(f.read(sample_bytes))
    return digest.hexdigest()[:16]
