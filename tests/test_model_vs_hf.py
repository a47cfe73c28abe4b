"""Our logits against transformers' LlamaForCausalLM / MistralForCausalLM on the same checkpoint."""

import pytest
import torch

from catsgen import linear
from catsgen.checkpoint import load_model
from conftest import CONFIGS, VOCAB

SEQ = 24  # longer than the Mistral sliding window (7)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_forward_matches_transformers(checkpoints, name):
    directory, hf = checkpoints[name]
    ours = load_model(directory, dtype=torch.float32)
    idx = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(idx), hf(idx).logits) < 1e-4


@pytest.mark.parametrize("name,kernels,batch", [(name, False, 2) for name in CONFIGS] +
                         [("gqa", True, 2), ("mistral_window", True, 2), ("llama31_rope", True, 2), ("gqa", True, 1)])
def test_cached_prefill_and_decode_match_transformers(checkpoints, name, kernels, batch, monkeypatch):
    """kernels: decode steps through the CUDA path's Triton kernels (here the interpreter): RoPE,
    the cache write and attention in one launch (decode_attention_rope); one token: W_o's GEMV
    adds the residual."""
    monkeypatch.setattr(linear, "FORCE_TRITON", kernels)
    directory, hf = checkpoints[name]
    ours = load_model(directory, dtype=torch.float32)
    ours.setup_caches(batch_size=batch, max_seq_len=64)
    idx = torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(2))
    prefill = 10
    with torch.no_grad():
        reference = hf(idx).logits
        steps = [ours(idx[:, :prefill], torch.arange(prefill))]
        steps += [ours(idx[:, t:t + 1], torch.tensor([t])) for t in range(prefill, SEQ)]
    assert rel_err(torch.cat(steps, dim=1), reference) < 1e-4


def test_long_context_llama31_rope_scaling_beyond_original_context(checkpoints):
    # positions past original_max_position_embeddings (32) exercise the llama3 frequency bands
    directory, hf = checkpoints["llama31_rope"]
    ours = load_model(directory, dtype=torch.float32)
    idx = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(ours(idx), hf(idx).logits) < 1e-4


def test_layout_is_fused_and_transposed(checkpoints):
    directory, hf = checkpoints["gqa"]
    ours = load_model(directory, dtype=torch.float32)
    layer, hf_layer = ours.layers[0], hf.model.layers[0]
    attn = hf_layer.self_attn
    expected = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(layer.attention.wqkv.weight, expected)
    assert torch.equal(layer.feed_forward.w_down_t, hf_layer.mlp.down_proj.weight.t())
    assert layer.feed_forward.w_down_t.is_contiguous()


def test_tied_embeddings_share_storage(checkpoints):
    ours = load_model(checkpoints["tied"][0], dtype=torch.float32)
    assert ours.output.weight.data_ptr() == ours.tok_embeddings.weight.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_load_is_close(checkpoints, dtype):
    directory, hf = checkpoints["gqa"]
    ours = load_model(directory, dtype=dtype)
    assert ours.layers[0].feed_forward.w_up.dtype == dtype
    idx = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(ours(idx).float(), hf(idx).logits) < 3e-2


@pytest.mark.parametrize("name", ["gqa", "mistral_window"])
def test_cpu_prefix_attention_equals_the_full_cache(checkpoints, name, monkeypatch):
    """On the CPU, prefill and decode attend over the filled prefix only; reading the whole static
    cache (what CUDA graphs need) gives the same logits."""
    ours = load_model(checkpoints[name][0], dtype=torch.float32)
    idx = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(5))

    def run():
        ours.setup_caches(batch_size=1, max_seq_len=64)
        with torch.no_grad():
            steps = [ours(idx[:, :10], torch.arange(10))]
            return torch.cat(steps + [ours(idx[:, t:t + 1], torch.tensor([t])) for t in range(10, SEQ)], dim=1)

    assert ours.cached_length(torch.tensor([SEQ - 1])) == SEQ  # the prefix path is the one under test
    prefix = run()
    monkeypatch.setattr(type(ours), "cached_length", lambda self, input_pos: self.max_seq_len)
    torch.testing.assert_close(prefix, run(), rtol=1e-5, atol=1e-5)


def test_forward_without_head_returns_the_last_hidden_states(checkpoints):
    ours = load_model(checkpoints["gqa"][0], dtype=torch.float32)
    idx = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        hidden = ours(idx, head=False)
        assert hidden.shape == (1, 8, ours.config.dim)
        torch.testing.assert_close(ours.output(ours.norm(hidden)), ours(idx))
