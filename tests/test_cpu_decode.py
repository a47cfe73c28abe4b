"""The CPU decode path: the dense MLP through embedding_bag equals the matmul path, the GEMV
weights are column-major on the CPU (and still the checkpoint's values), attention's one-thread
section gives the thread count back. CATS on this path: tests/test_cats.py."""

import pytest
import torch
import torch.nn.functional as F

from catsgen.checkpoint import load_model
from catsgen.model import DenseSiLU, one_thread

D, FF = 48, 80


@pytest.mark.parametrize("shape", [(1, 1, D), (2, 3, D)])
def test_cpu_dense_decode_mlp_equals_the_matmul_path(shape, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w_gate, w_up, w_down_t = (torch.randn(FF, D, generator=g) / D ** 0.5 for _ in range(3))
    x = torch.randn(*shape, generator=g)
    calls = []
    embedding_bag = F.embedding_bag
    monkeypatch.setattr(F, "embedding_bag", lambda *a, **k: calls.append(1) or embedding_bag(*a, **k))
    reference = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down_t
    torch.testing.assert_close(DenseSiLU()(x, w_gate, w_up, w_down_t), reference, rtol=1e-5, atol=1e-6)
    assert calls  # the decode path under test, not the matmul one


def test_cpu_gemv_weights_are_column_major_with_the_checkpoint_values(checkpoints):
    directory, hf = checkpoints["tied"]
    ours = load_model(directory, dtype=torch.float32)
    layer, hf_layer = ours.layers[0], hf.model.layers[0]
    pairs = [(layer.attention.wo.weight, hf_layer.self_attn.o_proj.weight),
             (layer.feed_forward.w_gate, hf_layer.mlp.gate_proj.weight),
             (layer.feed_forward.w_up, hf_layer.mlp.up_proj.weight),
             (ours.output.weight, hf.lm_head.weight)]
    for ours_w, hf_w in pairs:
        assert ours_w.t().is_contiguous() and not ours_w.is_contiguous()
        assert torch.equal(ours_w, hf_w)
    assert layer.attention.wqkv.weight.t().is_contiguous()
    assert layer.feed_forward.w_down_t.is_contiguous()  # CATS skips its rows
    assert ours.output.weight is ours.tok_embeddings.weight  # still tied: one copy


def test_one_thread_gives_the_thread_count_back():
    before = torch.get_num_threads()
    with pytest.raises(KeyError):
        with one_thread():
            assert torch.get_num_threads() == 1
            raise KeyError
    assert torch.get_num_threads() == before
