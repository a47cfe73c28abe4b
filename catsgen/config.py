"""ModelConfig: the shape and numerics of a model, read from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

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
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"num_attention_heads ({self.n_heads}) is not a multiple of "
                            f"num_key_value_heads ({self.n_kv_heads})")

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
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{config_file} is not valid JSON: {e}") from None
        return cls.from_hf_dict(raw, source=str(config_file))

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        architectures = raw.get("architectures") or [_architecture_from_model_type(raw, source)]
        arch = architectures[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"{source}: architectures={arch!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise UserError(f"{source}: {flag}=true is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: hidden_act={raw['hidden_act']!r} is not supported (CATS needs silu)")

        def need(key):
            if key not in raw or raw[key] is None:
                raise UserError(f"{source}: required key {key!r} is missing")
            return raw[key]

        n_heads = int(need("num_attention_heads"))
        # transformers >= 5 writes "rope_parameters" (theta included) instead of rope_scaling.
        rope_params = raw.get("rope_parameters") or {}
        rope_scaling = _parse_rope_scaling(raw.get("rope_scaling") or rope_params, source)
        rope_theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        sliding = raw.get("sliding_window") if arch == "MistralForCausalLM" else None
        if sliding is not None and raw.get("use_sliding_window") is False:
            sliding = None
        return cls(
            dim=int(need("hidden_size")),
            n_layers=int(need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
            intermediate_size=int(need("intermediate_size")),
            vocab_size=int(need("vocab_size")),
            head_dim=int(raw.get("head_dim") or 0),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            sliding_window=int(sliding) if sliding is not None else None,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(raw.get("eos_token_id")),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            architecture=arch,
        )


def _architecture_from_model_type(raw: dict, source: str) -> str:
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
    model_type = raw.get("model_type")
    if model_type in by_type:
        return by_type[model_type]
    raise UserError(f"{source}: required key 'architectures' is missing")


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _parse_rope_scaling(scaling: dict | None, source: str) -> dict | None:
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
