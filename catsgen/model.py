"""A gpt-fast-style Llama/Mistral decoder: fused QKV, static KV cache, pluggable MLP activation."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from catsgen.config import ModelConfig
from catsgen.errors import UserError
from catsgen.kernels import decode_attention_rope, prepare_workspaces, rms_norm_reference, split_heads
from catsgen.linear import Linear, Normed, mlp, on_kernels, one_thread, use_triton
from catsgen.parallel import ShardPlan
from catsgen.memory import check_fits, kv_cache_bytes


class KVCache(nn.Module):
    """Static cache, keys and values in one buffer [2, B, n_kv_heads, max_seq_len, head_dim]:
    fixed shapes keep CUDA graphs valid, and one buffer takes a decode step's new key and value
    in one scatter (one kernel) instead of two."""

    def __init__(self, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device=None):
        super().__init__()
        shape = (2, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("kv", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # index_copy_ writes in place with a tensor index: no host sync, graph-capturable.
        self.kv.index_copy_(3, input_pos, torch.stack((k, v)))
        return self.kv[0], self.kv[1]


class Rope(NamedTuple):
    """RoPE for this forward: cos, sin [T, D] at its positions (the torch path), and the whole
    fp32 tables (cos, sin [max_seq_len, D]), which the decode kernel indexes itself."""
    cos: torch.Tensor
    sin: torch.Tensor
    tables: tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and not x.is_cuda:  # one fused op on the CPU (7 small ones below)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)  # HF's order: fp32, cast back, then scale


class DenseSiLU(nn.Module):
    """The MLP's default activation slot: the plain gated SiLU MLP. Subclasses (CATS, calibration
    recording) change only `activate`, what happens to v = SiLU(W_gate x) before the up product;
    an overridden `activate` runs on the torch path (catsgen/linear.py picks the kernels)."""

    def forward(self, x, w_gate, w_up, w_down_t):
        overridden = type(self).activate is not DenseSiLU.activate
        return mlp(x, w_gate, w_up, w_down_t, activate=self.activate if overridden else None)

    def activate(self, v):
        return v


class MLP(nn.Module):
    """Gated MLP. W_down is stored transposed ([f, d]) so that neuron i is one contiguous row,
    which lets the CATS kernels skip whole rows. The activation module owns the arithmetic.
    Each weight is a float Parameter or, quantized, an Int8Weight (catsgen/linear.py)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(hidden, dim), requires_grad=False)
        self.w_up = nn.Parameter(torch.empty(hidden, dim), requires_grad=False)
        self.w_down_t = nn.Parameter(torch.empty(hidden, dim), requires_grad=False)
        self.activation: nn.Module = DenseSiLU()

    def forward(self, x):
        return self.activation(x, self.w_gate, self.w_up, self.w_down_t)


@contextmanager
def swapped_activations(model: "Transformer", make: Callable[[int, nn.Module], nn.Module]):
    """Inside, layer i's MLP activation is make(i, its current activation); the previous ones
    always come back after (also on an exception). Calibration, measuring and allocation
    searches swap through here; installing CATS for a run is cats.set_sparsity."""
    previous = [mlp.activation for mlp in model.mlps]
    try:
        for i, (mlp, activation) in enumerate(zip(model.mlps, previous)):
            mlp.activation = make(i, activation)
        yield model
    finally:
        for mlp, activation in zip(model.mlps, previous):
            mlp.activation = activation


class Attention(nn.Module):
    # Decode on CUDA goes through the flash-decoding kernel (RoPE and the cache write fused in);
    # False keeps SDPA over the whole cache (the baseline scripts/gpu_attention.py measures against).
    decode_kernel = True

    def __init__(self, config: ModelConfig, plan: ShardPlan):
        super().__init__()
        # This rank's heads (all of them on one rank); wo's output is then a partial sum.
        self.n_heads, self.n_kv_heads, self.head_dim = plan.n_heads, plan.n_kv_heads, config.head_dim
        self.sliding_window = config.sliding_window
        self.wqkv = Linear(config.dim, plan.q_size + 2 * plan.kv_size)
        self.wo = Linear(plan.q_size, config.dim)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Normed, rope: Rope, mask, input_pos=None, residual=None):
        """residual: added to W_o's output (by its GEMV on the decode path), or None."""
        qkv = self.wqkv(x)
        B, T, _ = qkv.shape
        cached = input_pos is not None and self.kv_cache is not None
        if cached and T == 1 and self.decode_kernel and on_kernels(qkv):
            # decode: RoPE, the cache write and attention over the allowed positions in one launch
            y = decode_attention_rope(qkv, *rope.tables, self.kv_cache.kv, input_pos, self.n_heads,
                                      self.sliding_window, use_triton=use_triton())
            return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), residual)
        q, k, v = split_heads(qkv, self.n_heads, self.n_kv_heads, rope.cos, rope.sin)

        if cached:
            k, v = self.kv_cache.update(input_pos, k, v)
            if mask.shape[-1] < k.shape[2]:  # the mask covers the filled prefix only (CPU, eager)
                k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
                if T == 1:  # one new token over the prefix: small work, one thread does it best
                    with one_thread():
                        y = self._attend(q, k, v, None if self.sliding_window is None else mask)
                    return self.wo(y, residual)
        return self.wo(self._attend(q, k, v, mask), residual)

    def _attend(self, q, k, v, mask):
        """SDPA; q [B, H, T, D] -> [B, T, H * D]. mask None: every query sees every key."""
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        return y.transpose(1, 2).flatten(2)


def attention_mask(q_positions, kv_positions, sliding_window):
    """Boolean [1, 1, T, S] mask: causal, and within the sliding window when there is one."""
    delta = q_positions[:, None] - kv_positions[None, :]
    allowed = delta >= 0
    if sliding_window is not None:
        allowed = allowed & (delta < sliding_window)
    return allowed[None, None]


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, plan: ShardPlan):
        super().__init__()
        self.plan = plan
        self.attention = Attention(config, plan)
        self.feed_forward = MLP(config.dim, plan.neurons)
        self.attention_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.rms_norm_eps)

    def forward(self, x, rope: Rope, mask, input_pos=None):
        # The norms travel with their inputs (Normed): the decode kernels fold them in. plan.reduce:
        # the all-reduce of the ranks' partial sums (after W_o, after W_down); on one rank W_o's
        # GEMV adds the residual itself.
        if self.plan.world == 1:
            h = self.attention(Normed(x, self.attention_norm), rope, mask, input_pos, residual=x)
        else:
            h = x + self.plan.reduce(self.attention(Normed(x, self.attention_norm), rope, mask, input_pos))
        return h + self.plan.reduce(self.feed_forward(Normed(h, self.ffn_norm)))


class Transformer(nn.Module):
    """plan: this rank's share under tensor parallelism (catsgen/parallel.py); default the whole
    model. The config stays the whole model's; embeddings, norms and the LM head are replicated."""

    def __init__(self, config: ModelConfig, plan: ShardPlan | None = None):
        super().__init__()
        self.config = config
        self.plan = plan or ShardPlan.make(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, self.plan) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_seq_len = 0
        self.quantize = "none"  # "int8": decoder linears quantized (catsgen/linear.py quantize_model)
        # Inference only: no weight ever needs a gradient (the fisher calibration's backward
        # wants the activations' alone, and must not allocate one per weight matrix).
        self.requires_grad_(False)

    @property
    def mlps(self) -> list[MLP]:
        return [layer.feed_forward for layer in self.layers]

    def setup_caches(self, batch_size: int, max_seq_len: int):
        """Allocate the static KV cache and the RoPE tables for up to max_seq_len positions."""
        c = self.config
        dtype, device = self.output.weight.dtype, self.output.weight.device
        need = kv_cache_bytes(c.n_layers, batch_size, max_seq_len, self.plan.n_kv_heads, c.head_dim,
                              self.output.weight.element_size())
        check_fits(f"the KV cache for --max-seq-len {max_seq_len} (batch {batch_size})", need, device,
                   ": lower --max-seq-len")
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, max_seq_len, self.plan.n_kv_heads, c.head_dim, dtype, device)
        prepare_workspaces(device, batch_size, self.plan.n_kv_heads)  # now: before any CUDA-graph capture
        self.max_seq_len = max_seq_len
        self.setup_rope(max_seq_len)

    def setup_rope(self, max_seq_len: int):
        device = self.output.weight.device
        cos, sin = rope_tables(self.config, max_seq_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, input_pos=None, head: bool = True):
        """idx [B, T] token ids. With input_pos [T] the static KV cache is used (prefill/decode);
        without it, a plain causal forward over positions 0..T-1 (calibration, perplexity).
        head=False stops after the last layer (its hidden states): calibration statistics need
        no logits, and the LM head is the largest matrix of a small model."""
        T = idx.shape[1]
        positions = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        if getattr(self, "rope_cos", None) is None or self.rope_cos.shape[0] < T:
            self.setup_rope(max(T, self.max_seq_len))
        rope = Rope(self.rope_cos[positions], self.rope_sin[positions], (self.rope_cos, self.rope_sin))
        # One mask for every layer: over the static cache, or over this sequence alone.
        cached = input_pos is not None and self.max_seq_len > 0
        kv_positions = torch.arange(self.cached_length(input_pos), device=idx.device) if cached else positions
        mask = attention_mask(positions, kv_positions, self.config.sliding_window)
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, rope, mask, input_pos)
        return self.output(self.norm(x)) if head else x

    def cached_length(self, input_pos) -> int:
        """Cache positions attention reads. On the CPU in eager mode, the filled prefix only
        (up to the last position written; reading its value costs no sync there): a short
        generation no longer attends over the whole static cache. On CUDA and when compiling,
        the whole cache: fixed shapes keep the compiled graph and its CUDA graph valid."""
        if input_pos.is_cuda or torch.compiler.is_compiling():
            return self.max_seq_len
        return int(input_pos.max()) + 1


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """RoPE's head_dim/2 inverse frequencies, as transformers computes them (the GGUF converter
    also uses them to recognise Llama-3.1 scaling stored as a tensor)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        return _llama3_inverse_frequencies(inv_freq, scaling)
    if scaling["rope_type"] == "dynamic":
        # Dynamic NTK only changes the base past the original context, and we size the table
        # once: inside the original context it is the default rotary embedding.
        return inv_freq
    raise ValueError(f"unknown rope_type {scaling['rope_type']}")


def _llama3_inverse_frequencies(inv_freq, scaling):
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(config: ModelConfig, max_seq_len: int, device=None):
    scaling = config.rope_scaling
    if scaling and scaling["rope_type"] == "dynamic" and max_seq_len > config.max_position_embeddings:
        raise UserError(f"dynamic NTK rope scaling past max_position_embeddings "
                        f"({config.max_position_embeddings}) is not supported: lower --max-seq-len")
    inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)
