"""Shared GGUF test helpers: the real SmolLM2 GGUF (converted once per session), references that
do not come from catsgen (llama.cpp's permutation, transformers' own GGUF loading), and tiny
synthetic GGUF files written with gguf.GGUFWriter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from catsgen.errors import UserError


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from catsgen.default_model import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except UserError as e:  # the test set-up installs it: a missing package is a failure, not a skip
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_gguf, tmp_path_factory) -> Path:
    """The real GGUF converted once (float32) for the whole session."""
    from catsgen.gguf import convert_gguf

    return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("convert") / "smollm2")


@pytest.fixture(scope="session")
def smollm2_reader(smollm2_gguf):
    import gguf

    return gguf.GGUFReader(smollm2_gguf)


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF q/k rows -> llama.cpp's RoPE row order, as llama.cpp's convert_hf_to_gguf.py `permute` does."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def dequantized(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in HF (row-major, outermost dim first) shape, straight from gguf."""
    import gguf

    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def transformers_gguf_model(gguf_path: Path):
    """transformers' own GGUF loading, in float32.

    `from_pretrained(..., gguf_file=...)` refuses to run without `accelerate`; where it is not
    installed, build the model from the same GGUF config and load the tensors with
    `load_gguf_checkpoint`, the function from_pretrained uses to dequantize and un-permute.
    """
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.utils import is_accelerate_available

    gguf_path = Path(gguf_path)
    if is_accelerate_available():
        return LlamaForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers were built on meta
    return model.float().eval()


# --- tiny synthetic GGUF files ------------------------------------------------------------------

TINY = dict(dim=64, n_heads=4, n_kv_heads=2, ffn=96, n_layers=2)


def byte_level_vocab():
    """A small GPT-2-style vocabulary: 3 control tokens, the 256 byte symbols, a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    tokens = specials + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, types, merges


def hf_weights(vocab: int, tied: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a tiny Llama, with HF names and shapes."""
    g = torch.Generator().manual_seed(seed)
    d, f, kv = TINY["dim"], TINY["ffn"], TINY["n_kv_heads"] * TINY["dim"] // TINY["n_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, d)
    layer = {"input_layernorm": (d,), "post_attention_layernorm": (d,), "self_attn.q_proj": (d, d),
             "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, d),
             "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    for i in range(TINY["n_layers"]):
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()})
    return {k: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.1 * torch.randn(s, generator=g)
            for k, s in shapes.items()}


# HF name piece -> GGUF name piece (llama.cpp's tensor names), written out here independently of catsgen.
_GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    base = hf_name.removesuffix(".weight")
    if base.startswith("model.layers."):
        _, _, i, rest = base.split(".", 3)
        return f"blk.{i}.{_GGUF_NAMES[rest]}.weight"
    return f"{_GGUF_NAMES[base]}.weight"


def write_tiny_gguf(path: Path, *, arch: str = "llama", tied: bool = False, qtype: str = "F32",
                    tokenizer: dict | None = None, extra_metadata: dict | None = None,
                    extra_tensors: dict | None = None, drop: tuple = (), seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a tiny Llama GGUF the way llama.cpp lays it out (q/k rows permuted, 2-D weights in
    `qtype`, norms in F32). Returns the HF-layout weights as they will read back (after quantization)."""
    import gguf

    tokenizer = tokenizer or dict(zip(("tokens", "types", "merges"), byte_level_vocab()), model="gpt2", pre="smollm")
    weights = hf_weights(len(tokenizer["tokens"]), tied, seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["n_layers"])
    w.add_context_length(256)
    w.add_embedding_length(TINY["dim"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["n_heads"])
    w.add_head_count_kv(TINY["n_kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer["model"])
    if "pre" in tokenizer:
        w.add_tokenizer_pre(tokenizer["pre"])
    w.add_token_list(tokenizer["tokens"])
    w.add_token_types(tokenizer["types"])
    if "merges" in tokenizer:
        w.add_token_merges(tokenizer["merges"])
    if "scores" in tokenizer:
        w.add_token_scores(tokenizer["scores"])
    w.add_bos_token_id(tokenizer.get("bos", 1))
    w.add_eos_token_id(tokenizer.get("eos", 2))
    for key, value in (extra_metadata or {}).items():
        add = {str: w.add_string, bool: w.add_bool, int: w.add_uint32, float: w.add_float32}[type(value)]
        add(key, value)
    readback = {}
    for name, t in weights.items():
        if name in drop:
            continue
        data = t.numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            n_kv = TINY["n_kv_heads"] if "k_proj" in name else None
            data = llamacpp_permute(data, TINY["n_heads"], n_kv)
        if data.ndim == 2 and qtype != "F32":
            q = gguf.GGMLQuantizationType[qtype]
            raw = gguf.quants.quantize(data, q)
            w.add_tensor(gguf_name(name), raw, raw_dtype=q)
            back = gguf.quants.dequantize(raw, q).astype(np.float32)
        else:
            w.add_tensor(gguf_name(name), data)
            back = data
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # what an exact un-permute gives back
            back = _hf_order(back, TINY["n_heads"] if "q_proj" in name else TINY["n_kv_heads"])
        readback[name] = torch.from_numpy(np.array(back, dtype=np.float32))
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return readback


def _hf_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Row i of head h in HF order is row 2i (first half) or 2(i - hd/2) + 1 (second half) in
    llama.cpp order: spelled out row by row, independently of both permute implementations."""
    hd = w.shape[0] // n_heads
    src = [h * hd + (2 * i if i < hd // 2 else 2 * (i - hd // 2) + 1) for h in range(n_heads) for i in range(hd)]
    return w[src]
