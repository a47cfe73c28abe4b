"""ModelConfig: the shape and numerics of a model, read from a checkpoint's config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

from catsgen.errors import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0  # 0: dim // n_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)

    @property
    def qkv_dim(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "ModelConfig":
        path = Path(checkpoint_dir)
        if not path.exists():
            raise UserError(f"checkpoint directory {path} does not exist")
        if not path.is_dir():
            raise UserError(f"checkpoint {path} is not a directory")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UserError(f"{path} has no config.json: is it a Hugging Face checkpoint directory?")
        return cls.from_hf_dict(read_json_object(config_file), source=str(config_file))

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        """Every key the engine reads is checked (type, range, relations) here, once."""
        raw = _checked_keys(raw, CONFIG_KEYS, source)
        arch = (raw.get("architectures") or [_architecture_from_model_type(raw, source)])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"{source}: architectures={arch!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise UserError(f"{source}: {flag}=true is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (CATS needs silu)")
        for key in REQUIRED_KEYS:
            if key not in raw:
                raise UserError(f"{source}: required key {key!r} is missing")
        # transformers >= 5 writes "rope_parameters" (theta included) instead of rope_scaling.
        rope_params = _checked_keys(raw.get("rope_parameters") or {}, ROPE_KEYS, f"{source}: rope_parameters")
        rope_scaling = _parse_rope_scaling(raw.get("rope_scaling") or rope_params, source)
        sliding = raw.get("sliding_window") if arch == "MistralForCausalLM" else None
        if raw.get("use_sliding_window") is False:
            sliding = None
        n_heads = raw["num_attention_heads"]
        config = cls(
            dim=raw["hidden_size"],
            n_layers=raw["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=raw.get("num_key_value_heads", n_heads),
            intermediate_size=raw["intermediate_size"],
            vocab_size=raw["vocab_size"],
            head_dim=raw.get("head_dim", 0),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            sliding_window=sliding,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(raw.get("eos_token_id")),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype") or "bfloat16",
            architecture=arch,
        )
        _check_relations(config, "head_dim" in raw, source)
        return config


def read_text(path: Path) -> str:
    """A UTF-8 text file; unreadable or non-UTF-8 content is a one-line error naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (at byte offset {e.start}: {e.reason})") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read: {e.strerror}") from None


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object: any other content is a one-line error naming it."""
    try:
        raw = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a JSON object, not {json.dumps(raw)[:40]}")
    return raw


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int in Python


def _is_number(value) -> bool:
    # json reads NaN and Infinity, so finiteness is checked too.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Rule(NamedTuple):
    what: str
    holds: Callable[[object], bool]


INT_LIMIT = 2**31  # sizes are int32 indices in the kernels; larger values are typos
POSITIVE_INT = Rule("a positive integer", lambda v: _is_int(v) and 0 < v < INT_LIMIT)
TOKEN_ID = Rule("a token id (an integer >= 0)", lambda v: _is_int(v) and 0 <= v < INT_LIMIT)
TOKEN_IDS = Rule("a token id or a list of token ids",
                 lambda v: TOKEN_ID.holds(v) or (isinstance(v, list) and all(map(TOKEN_ID.holds, v))))
POSITIVE_NUMBER = Rule("a positive finite number", lambda v: _is_number(v) and v > 0)
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
STRING = Rule("a string", lambda v: isinstance(v, str))
OBJECT = Rule("a JSON object", lambda v: isinstance(v, dict))
STRINGS = Rule("a non-empty list of strings",
               lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(s, str) for s in v))

# Every config.json key the engine reads, with what it must hold. null counts as absent
# (transformers writes null for options left unset, e.g. head_dim or sliding_window).
CONFIG_KEYS = {
    "architectures": STRINGS, "model_type": STRING, "hidden_act": STRING,
    "torch_dtype": STRING, "dtype": STRING,
    "attention_bias": BOOL, "mlp_bias": BOOL, "tie_word_embeddings": BOOL, "use_sliding_window": BOOL,
    **dict.fromkeys(("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings",
                     "sliding_window"), POSITIVE_INT),
    "rms_norm_eps": POSITIVE_NUMBER, "rope_theta": POSITIVE_NUMBER,
    "rope_scaling": OBJECT, "rope_parameters": OBJECT,
    "bos_token_id": TOKEN_ID, "eos_token_id": TOKEN_IDS,
}
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
ROPE_KEYS = {"rope_type": STRING, "type": STRING, "rope_theta": POSITIVE_NUMBER, "factor": POSITIVE_NUMBER,
             "low_freq_factor": POSITIVE_NUMBER, "high_freq_factor": POSITIVE_NUMBER,
             "original_max_position_embeddings": POSITIVE_INT}


def _checked_keys(raw: dict, rules: dict[str, Rule], source: str) -> dict:
    """raw without its null values, after checking each known key against its rule."""
    present = {key: value for key, value in raw.items() if value is not None}
    for key, rule in rules.items():
        if key in present and not rule.holds(present[key]):
            raise UserError(f"{source}: {key} must be {rule.what}, not {json.dumps(present[key])[:40]}")
    return present


# Relations between the keys, checked on the parsed config: (holds, message naming the keys).
RELATIONS = (
    (lambda c, explicit_head_dim: explicit_head_dim or c.dim % c.n_heads == 0,
     "hidden_size ({c.dim}) is not a multiple of num_attention_heads ({c.n_heads}) and no head_dim is given"),
    (lambda c, _: c.n_heads % c.n_kv_heads == 0,
     "num_attention_heads ({c.n_heads}) is not a multiple of num_key_value_heads ({c.n_kv_heads})"),
    (lambda c, _: c.head_dim % 2 == 0,
     "the head dimension ({c.head_dim}) is odd: rotary embeddings need an even one"),
    (lambda c, _: all(i < c.vocab_size for i in (*c.eos_token_ids, c.bos_token_id or 0)),
     "bos_token_id / eos_token_id ({c.bos_token_id} / {c.eos_token_ids}) must be below vocab_size ({c.vocab_size})"),
    (lambda c, _: c.rope_scaling is None or c.rope_scaling["rope_type"] != "llama3"
     or c.rope_scaling.get("low_freq_factor", 1.0) < c.rope_scaling.get("high_freq_factor", 4.0),
     "rope_scaling: low_freq_factor must be below high_freq_factor ({c.rope_scaling})"),
)


def _check_relations(config: "ModelConfig", explicit_head_dim: bool, source: str):
    for holds, message in RELATIONS:
        if not holds(config, explicit_head_dim):
            raise UserError(f"{source}: " + message.format(c=config))


def _architecture_from_model_type(raw: dict, source: str) -> str:
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
    model_type = raw.get("model_type")
    if model_type in by_type:
        return by_type[model_type]
    raise UserError(f"{source}: required key 'architectures' is missing")


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def _parse_rope_scaling(scaling: dict, source: str) -> dict | None:
    scaling = _checked_keys(scaling, ROPE_KEYS, f"{source}: rope_scaling")
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(f"{source}: rope_scaling type {rope_type!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return None
    if "factor" not in scaling:
        raise UserError(f"{source}: rope_scaling is missing required key 'factor'")
    return {**scaling, "rope_type": rope_type}


# Random-weight presets for speed benchmarks: real shapes, no checkpoint needed.
PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                              intermediate_size=11008, vocab_size=32000, rms_norm_eps=1e-5,
                              max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,)),
    # 138 GB in bf16: more than one GPU (tensor parallelism, catsgen/parallel.py); N in 1, 2, 4, 8.
    "llama-2-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                               intermediate_size=28672, vocab_size=32000, rms_norm_eps=1e-5,
                               max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,)),
    "mistral-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                              intermediate_size=14336, vocab_size=32000, rms_norm_eps=1e-5,
                              max_position_embeddings=32768, sliding_window=4096,
                              bos_token_id=1, eos_token_ids=(2,), architecture="MistralForCausalLM"),
    "llama-3-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                              intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5,
                              rope_theta=500000.0, max_position_embeddings=8192,
                              bos_token_id=128000, eos_token_ids=(128001, 128009)),
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=160,
                        vocab_size=256, max_position_embeddings=512, torch_dtype="float32",
                        bos_token_id=1, eos_token_ids=(2,)),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})")
    return replace(PRESETS[name])
