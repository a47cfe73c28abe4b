"""The CPU decode path: the dense MLP through embedding_bag equals the matmul path, the CATS one
(W_up rows gathered or read whole) the masked dense MLP, the GEMV weights are column-major on the
CPU (and still the checkpoint's values), W_up row-major under CATS, the one-thread section gives
the thread count back."""

import pytest
import torch
import torch.nn.functional as F

from catsgen import cats, linear
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


@pytest.mark.parametrize("shape", [(1, 1, D), (3, 1, D), (2, 3, D)])
@pytest.mark.parametrize("per_neuron", [False, True])
@pytest.mark.parametrize("up_rows", [True, False])
def test_cpu_cats_decode_mlp_equals_the_masked_reference(shape, per_neuron, up_rows, monkeypatch):
    """Row-major W_up (CATS on the CPU): a GEMV over a gather of the active rows, on one thread;
    column-major: the whole GEMV. Either way the masked dense MLP's result."""
    g = torch.Generator().manual_seed(3)
    w_gate, w_up, w_down_t = (torch.randn(FF, D, generator=g) / D ** 0.5 for _ in range(3))
    w_up = w_up if up_rows else w_up.t().contiguous().t()
    x = torch.randn(*shape, generator=g)
    t = torch.linspace(0.05, 0.6, FF) if per_neuron else torch.tensor(0.3)
    v = F.silu(x @ w_gate.T)
    skipped = (v.abs() <= t).flatten(0, 1).all(0).double().mean()
    assert 0.05 < skipped < 0.95  # some rows really skipped, some read
    gathers = []
    single = linear.one_thread
    monkeypatch.setattr(linear, "one_thread", lambda: gathers.append(1) or single())
    reference = (torch.where(v.abs() > t, v, 0) * (x @ w_up.T)) @ w_down_t
    torch.testing.assert_close(cats.CATS(0, t)(x, w_gate, w_up, w_down_t), reference, rtol=1e-5, atol=1e-6)
    assert len(gathers) == (1 if up_rows else 0)


def test_cats_lays_w_up_out_row_major_in_sparse_layers_and_dense_back(checkpoints):
    directory, hf = checkpoints["tied"]
    model = load_model(directory, dtype=torch.float32)
    w_up = [mlp.w_up.clone() for mlp in model.mlps]
    n = model.config.n_layers
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():
        dense = model(idx)
        sparsities = [linear.UP_GATHER_SPARSITY + (0.1 if i % 2 else -0.1) for i in range(n)]
        cats.set_thresholds(model, [0.1] * n, sparsities)
        assert [mlp.w_up.is_contiguous() for mlp in model.mlps] == [bool(i % 2) for i in range(n)]
        assert all(torch.equal(mlp.w_up, w) for mlp, w in zip(model.mlps, w_up))
        cats.set_dense(model)
        assert all(mlp.w_up.t().is_contiguous() and torch.equal(mlp.w_up, w) for mlp, w in zip(model.mlps, w_up))
        assert torch.equal(model(idx), dense)  # the dense model's arithmetic again, bit for bit


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
