"""GGUF (llama.cpp) -> Hugging Face checkpoint directory, for Llama-architecture models.

The engine only loads HF-layout directories; this turns a GGUF into one:
config.json, model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json.
Quantized tensors are dequantized with the `gguf` package, so the written weights are exactly
the values llama.cpp computes with (not the original unquantized model).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from catsgen.errors import UserError

# Bump when the written directory changes, so cached conversions (default_model.py) are redone.
CONVERTER_VERSION = 1

# llama.cpp tokenizer.ggml.token_type values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

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


# ---------------------------------------------------------------------------------------------
# Reading the file


def _open_gguf(path: Path):
    import gguf

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct errors, ... on anything not GGUF
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a readable GGUF file ({reason})") from None
    # contents() turns each field into a Python value (str, int, float, bool or list).
    meta = {name: field.contents() for name, field in reader.fields.items()}
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
    """Everything that can be wrong with the file, found before any slow work."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r} is not supported (only 'llama': Llama, Mistral, SmolLM ...)")
    for t in reader.tensors:
        if hf_tensor_name(t.name) is None and t.name != "rope_freqs.weight":
            raise UserError(f"{path}: tensor {t.name!r} has no place in a Llama model "
                            "(MoE and biases are not supported)")
        if not _can_dequantize(t.tensor_type):
            raise UserError(f"{path}: tensor {t.name} is {t.tensor_type.name}, "
                            "which the gguf package cannot dequantize")


def _check_complete(path: Path, meta: dict, names: set[str]) -> None:
    n_layers = int(meta.get("llama.block_count", 0))
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight" for i in range(n_layers) for part in _LAYER_TENSORS.values()}
    if missing := expected - names:
        split = " (a split GGUF: merge its parts with llama-gguf-split --merge)" if "split.count" in meta else ""
        raise UserError(f"{path}: {len(missing)} tensors are missing, e.g. {min(missing)}{split}")
    if extra := names - expected - {"lm_head.weight"}:
        raise UserError(f"{path}: tensor {min(extra)} is beyond llama.block_count={n_layers}")


def _check_shapes(path: Path, config: dict, shapes: dict) -> None:
    """Every tensor must have the shape config.json implies (this also guards the q/k un-permute)."""
    d, f, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    layer = {"input_layernorm": (d,), "post_attention_layernorm": (d,), "self_attn.q_proj": (q, d),
             "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q),
             "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    for name, shape in shapes.items():
        part = name.removesuffix(".weight").split(".", 3)[-1]
        expected = {"model.embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d),
                    "model.norm.weight": (d,)}.get(name) or layer[part]
        if shape != expected:
            raise UserError(f"{path}: tensor {name} has shape {shape}, but the metadata implies {expected}")


def _tensor(t) -> torch.Tensor:
    """One GGUF tensor as a float32 tensor of HF shape (GGUF lists dims innermost first)."""
    import gguf

    w = gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape))
    return torch.from_numpy(np.array(w, dtype=np.float32)).reshape(shape)  # a copy: reader data is a read-only memmap


# ---------------------------------------------------------------------------------------------
# config.json, generation_config.json


def _llama3_rope_divisors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """What llama.cpp stores in rope_freqs.weight for Llama-3.1-style rope scaling: one divisor per frequency."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    band = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, band))


def _rope_scaling(path: Path, meta: dict, rope_freqs: np.ndarray | None, theta: float, head_dim: int) -> dict | None:
    if rope_freqs is not None:
        # Llama 3.1+ GGUFs keep the scaling only as rope_freqs.weight. Every Meta release uses these
        # parameters with the factor as the largest divisor; accept them only if they reproduce the tensor.
        factor = round(float(rope_freqs.max()), 4)  # float32 ratios: 7.9999995 means 8
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if factor == 1.0 and np.all(rope_freqs == 1.0):
            return None
        if rope_freqs.shape != (head_dim // 2,) or not np.allclose(
                rope_freqs, _llama3_rope_divisors(scaling, theta, head_dim), rtol=1e-5):
            raise UserError(f"{path}: rope_freqs.weight is not Llama-3.1-style rope scaling, "
                            "which is all config.json can express")
        return scaling
    kind = meta.get("llama.rope.scaling.type", "none")
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear", 1.0))
    if kind == "none" and factor == 1.0:
        return None
    if kind in ("linear", "none"):  # old files: only rope.scale_linear
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        return {"rope_type": "yarn", "factor": float(factor),
                "original_max_position_embeddings": int(meta["llama.rope.scaling.original_context_length"])}
    raise UserError(f"{path}: rope scaling type {kind!r} is not supported")


def _config(path: Path, meta: dict, shapes: dict, rope_freqs, dtype: torch.dtype) -> dict:
    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise UserError(f"{path}: metadata key llama.{key} is missing")
        return value

    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv_heads = int(get("attention.head_count_kv", n_heads))
    head_dim = int(get("attention.key_length", dim // n_heads))
    rope_dim, value_dim = int(get("rope.dimension_count", head_dim)), int(get("attention.value_length", head_dim))
    if rope_dim != head_dim or value_dim != head_dim:
        raise UserError(f"{path}: partial rotary or value heads of another size are not supported")
    theta = float(get("rope.freq_base", 10000.0))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "max_position_embeddings": int(get("context_length")),
        # The embedding's row count is the truth; llama.vocab_size is optional metadata.
        "vocab_size": shapes["model.embed_tokens.weight"][0],
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "catsgen_converted_from": {"gguf": path.name, "converter_version": CONVERTER_VERSION},
    }
    scaling = _rope_scaling(path, meta, rope_freqs, theta, head_dim)
    if scaling is not None:
        config["rope_scaling"] = scaling
    config.update(_special_ids(meta))
    return config


def _special_ids(meta: dict) -> dict:
    ids = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            ids[f"{name}_token_id"] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    return ids


def _generation_config(meta: dict) -> dict:
    ids = _special_ids(meta)
    # Chat models may end a turn with an end-of-turn token other than EOS (llama.cpp's eot_token_id).
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and "eos_token_id" in ids and eot != ids["eos_token_id"]:
        ids["eos_token_id"] = [ids["eos_token_id"], int(eot)]
    return ids


# ---------------------------------------------------------------------------------------------
# tokenizer.json, tokenizer_config.json

# Split regexes of llama.cpp's `tokenizer.ggml.pre` names, as in the models' own tokenizer.json.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = {"default", "gpt-2", "gpt2"}  # ByteLevel's own (GPT-2) regex
_DIGITS_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva"}  # digits split one by one first
_SPLIT_PRE = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
              "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
              "tekken": _TEKKEN_SPLIT}


def _byte_level_tokenizer(path: Path, meta: dict):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _GPT2_PRE:
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _DIGITS_PRE:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in _SPLIT_PRE:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise UserError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    # llama.cpp looks a whole Llama-3 word up in the vocabulary before merging (its ignore_merges).
    model = models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre in _SPLIT_PRE)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose joined piece has the highest score. As a
    merge list: every split of a normal piece into two normal pieces, best-scoring piece first."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for piece, i in ids.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_tokenizer(meta: dict):
    """Llama-2/Mistral-style vocabulary, laid out as in their (legacy) tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE({t: i for i, t in enumerate(tokens)}, _sentencepiece_merges(tokens, scores, types),
                       unk_token=tokens[unk_id] if unk_id is not None else None, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    # A space before each text run (also after a special token, as llama.cpp does), spaces as U+2581.
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if space_prefix else [])
                                          + [normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return tok


def _tokenizer(path: Path, meta: dict):
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _byte_level_tokenizer(path, meta)
    elif kind == "llama":
        tok = _sentencepiece_tokenizer(meta)
    else:
        raise UserError(f"{path}: tokenizer model {kind!r} is not supported "
                        "(only gpt2 byte-level BPE and llama sentencepiece)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    # Control tokens (<|im_start|>, <s>) and user-defined ones are matched whole in the text, before
    # any splitting. Each is in the vocabulary as spelled, so it keeps its id.
    added = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (UNKNOWN, CONTROL, USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for i, t in added if types[i] != USER_DEFINED])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for i, t in added if types[i] == USER_DEFINED])
    for i, t in added:
        if tok.token_to_id(t) != i:
            raise UserError(f"{path}: token {t!r} appears twice in the vocabulary; cannot build tokenizer.json")

    tok.post_processor = _post_processor(kind, meta, tokens)
    return tok


def _post_processor(kind: str, meta: dict, tokens: list[str]):
    """BOS/EOS around the text when the file asks for them (Llama-2/3 add BOS, SmolLM2 not)."""
    from tokenizers import processors

    steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    prefix = [tokens[bos]] if _add_bos(meta) and bos is not None else []
    suffix = [tokens[eos]] if meta.get("tokenizer.ggml.add_eos_token", False) and eos is not None else []
    if prefix or suffix:
        specials = {tokens[i]: i for i in (bos, eos) if i is not None and tokens[i] in prefix + suffix}
        steps.append(processors.TemplateProcessing(single=prefix + ["$A"] + suffix,
                                                   pair=prefix + ["$A"] + suffix + prefix + ["$B"] + suffix,
                                                   special_tokens=list(specials.items())))
    return steps[0] if len(steps) == 1 else processors.Sequence(steps) if steps else None


def _add_bos(meta: dict) -> bool:
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    return bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))


def _tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "add_bos_token": _add_bos(meta),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
              "clean_up_tokenization_spaces": False,
              "model_max_length": int(meta.get("llama.context_length", 2048))}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[f"{name}_token"] = tokens[int(meta[f"tokenizer.ggml.{key}_token_id"])]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


# ---------------------------------------------------------------------------------------------
# Writing the directory


def _write_atomically(out_dir: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Write into a temp dir next to out_dir, then rename: out_dir is either complete or untouched."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: already exists and is not empty; remove it or choose another output directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old = None
    try:
        write(tmp)
        for f in tmp.iterdir():  # mkdtemp and save_file make private files; a cache may be shared
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if out_dir.is_dir():
            old = out_dir.with_name(tmp.name + ".old")
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_gguf(gguf_path, out_dir, dtype: torch.dtype = torch.float32,
                 progress: Callable[[str], None] | None = None, overwrite: bool = False) -> Path:
    """Convert a Llama-architecture GGUF into an HF-layout directory; returns out_dir.

    progress, if given, receives a few one-line messages. overwrite replaces a non-empty out_dir
    (otherwise that is a UserError). Weights are written in `dtype`.
    """
    from safetensors.torch import save_file

    path, out_dir = Path(gguf_path), Path(out_dir)
    say = progress or (lambda message: None)
    reader, meta = _open_gguf(path)
    _check_model(path, reader, meta)
    tensors = {t.name: t for t in reader.tensors}
    shapes = {hf_tensor_name(n): tuple(int(d) for d in reversed(t.shape)) for n, t in tensors.items()
              if n != "rope_freqs.weight"}
    _check_complete(path, meta, set(shapes))
    rope_freqs = tensors.get("rope_freqs.weight")
    rope_freqs = _tensor(rope_freqs).numpy() if rope_freqs is not None else None
    config = _config(path, meta, shapes, rope_freqs, dtype)
    _check_shapes(path, config, shapes)
    tokenizer = _tokenizer(path, meta)  # before the slow part: an unsupported tokenizer fails fast
    n_heads, n_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def write(tmp: Path) -> None:
        weights = {}
        names = [n for n in tensors if n != "rope_freqs.weight"]
        for done, name in enumerate(names, 1):
            w = _tensor(tensors[name])
            if ".attn_q." in name:
                w = unpermute_rope_rows(w, n_heads)
            elif ".attn_k." in name:
                w = unpermute_rope_rows(w, n_kv_heads)
            weights[hf_tensor_name(name)] = w.to(dtype).contiguous()
            if done % max(1, len(names) // 4) == 0 or done == len(names):
                say(f"{path.name}: dequantized {done}/{len(names)} tensors")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, content in (("config.json", config), ("generation_config.json", _generation_config(meta)),
                              ("tokenizer_config.json", _tokenizer_config(meta))):
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")

    say(f"converting {path} ({len(tensors)} tensors) to {out_dir}")
    _write_atomically(out_dir, write, overwrite)
    return out_dir
