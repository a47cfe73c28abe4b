"""config.json and generation_config.json from a GGUF file's llama.* and tokenizer.ggml.* metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from catsgen.errors import UserError
from catsgen.model import rope_inverse_frequencies


def hf_config(path: Path, meta: dict, shapes: dict, rope_freqs: np.ndarray | None, dtype: torch.dtype,
              converted_from: dict) -> dict:
    """config.json of an HF LlamaForCausalLM; `shapes` (HF name -> shape) gives the vocabulary
    size and whether the embeddings are tied, `converted_from` is recorded as is."""
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
        "catsgen_converted_from": converted_from,
    }
    scaling = _rope_scaling(path, meta, rope_freqs, theta, head_dim)
    if scaling is not None:
        config["rope_scaling"] = scaling
    config.update(_special_ids(meta))
    _check_shapes(path, config, shapes)
    return config


def _rope_scaling(path: Path, meta: dict, rope_freqs: np.ndarray | None, theta: float, head_dim: int) -> dict | None:
    if rope_freqs is not None:
        # Llama 3.1+ GGUFs keep the scaling only as rope_freqs.weight: one divisor per frequency.
        # Every Meta release uses these parameters with the factor as the largest divisor; accept
        # them only if they reproduce the tensor.
        factor = round(float(rope_freqs.max()), 4)  # float32 ratios: 7.9999995 means 8
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if factor == 1.0 and np.all(rope_freqs == 1.0):
            return None
        if rope_freqs.shape != (head_dim // 2,) or not np.allclose(
                rope_freqs, _divisors(scaling, theta, head_dim), rtol=1e-5):
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


def _divisors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """What llama.cpp stores in rope_freqs.weight for this scaling: plain over scaled inverse frequencies."""
    plain = rope_inverse_frequencies(head_dim, theta).double()
    return (plain / rope_inverse_frequencies(head_dim, theta, scaling).double()).numpy()


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


def _special_ids(meta: dict) -> dict:
    ids = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            ids[f"{name}_token_id"] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    return ids


def generation_config(meta: dict) -> dict:
    ids = _special_ids(meta)
    # Chat models may end a turn with an end-of-turn token other than EOS (llama.cpp's eot_token_id).
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and "eos_token_id" in ids and eot != ids["eos_token_id"]:
        ids["eos_token_id"] = [ids["eos_token_id"], int(eot)]
    return ids
