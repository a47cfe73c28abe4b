"""The int8 model (--quantize int8) against a reference int8 model: the same checkpoint with the
dequantized weights placed as float weights in the plain torch path, dense and CATS, through
torch and through the Triton kernels (interpreter); the CLI on the real SmolLM2; bench's bytes."""

import json

import pytest
import torch

from catsgen import cats, linear
from catsgen.bench import weight_bytes_per_token
from catsgen.checkpoint import load_model
from catsgen.config import preset
from catsgen.linear import decoder_linear_names
from catsgen.quantize import Int8Weight, quantize_int8
from catsgen.thresholds import load_thresholds
from conftest import run_cli
from helpers_gguf import smollm2_converted, smollm2_gguf  # noqa: F401
from helpers_kernels import rel_err


def dequantized_reference(directory, int8_model):
    """The float model of `directory` with every decoder linear replaced by the int8 model's
    dequantized weight (in the float model's layout, row-major as on CUDA: with FORCE_TRITON the
    kernels run on these CPU tensors, where load_model keeps GEMV weights column-major)."""
    ref = load_model(directory, dtype=torch.float32)
    for name in decoder_linear_names(ref.config.n_layers):
        ref.get_parameter(name).data = int8_model.get_submodule(name).dequantize(torch.float32).contiguous()
    return ref


@pytest.fixture(scope="module")
def pair(calibrated):
    directory, thresholds_path, _, _ = calibrated
    int8 = load_model(directory, dtype=torch.float32, quantize="int8")
    return directory, thresholds_path, int8, dequantized_reference(directory, int8)


def test_load_quantizes_every_decoder_linear_and_nothing_else(pair):
    directory, _, int8, _ = pair
    float_model = load_model(directory, dtype=torch.float32)
    names = decoder_linear_names(int8.config.n_layers)
    for name in names:
        w = int8.get_submodule(name)
        assert isinstance(w, Int8Weight) and w.q.dtype == torch.int8
        expected = float_model.get_parameter(name)
        transposed = name.endswith("w_down_t")  # quantized per output channel of W_down, stored transposed
        q, scale = quantize_int8(expected.t() if transposed else expected)
        assert torch.equal(w.q, q.t() if transposed else q) and torch.equal(w.scale, scale)
        assert torch.equal(w.q_rows, q) if transposed else w.q_rows is None  # W_down also as [d, f] rows
    floats = {n for n, _ in int8.named_parameters()}
    assert floats == {"tok_embeddings.weight", "output.weight", "norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(int8.config.n_layers) for n in ("attention_norm", "ffn_norm")}
    assert int8.quantize == "int8" and int8.output.weight.dtype == torch.float32


def _set_mode(models, table, mode):
    for model in models:
        if mode == "dense":
            cats.set_dense(model)
        else:  # uniform: a threshold per layer; fisher: one per neuron
            cats.set_sparsity(model, table, 0.5, mode)


@pytest.mark.parametrize("mode", ["dense", "uniform", "fisher"])
@pytest.mark.parametrize("triton", [False, True])
def test_int8_logits_equal_the_dequantized_reference(pair, monkeypatch, mode, triton):
    directory, thresholds_path, int8, ref = pair
    table = load_thresholds(int8, directory, thresholds_path)  # made on the float model: serves int8 too
    _set_mode((int8, ref), table, mode)
    # <= KERNEL_MAX_TOKENS tokens: with FORCE_TRITON, W_qkv / W_o run int8_gemv and the MLP the
    # int8 cats_mlp kernel (the decode path on CUDA), here under the interpreter.
    monkeypatch.setattr(linear, "FORCE_TRITON", triton)
    idx = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        got, expected = int8(idx), ref(idx)
    assert rel_err(got, expected) < 1e-4
    if mode != "dense":  # CATS really masked something in the int8 model
        counter = cats.measure_sparsity(int8, idx, cats.SparsityCounter(int8.config.n_layers, 0.5))
        assert 0.2 < counter.overall() < 0.8


def test_generate_int8_on_smollm2_through_the_cli(smollm2_converted):  # noqa: F811
    from catsgen.tokenizer import Tokenizer
    prompt, new_tokens = "The capital of France is", 6
    result = run_cli("generate.py", "--checkpoint", smollm2_converted, "--prompt", prompt, "--quantize", "int8",
                     "--max-new-tokens", new_tokens, "--device", "cpu", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    # The reference: greedy steps of the dequantized float model, a full forward per token.
    int8 = load_model(smollm2_converted, dtype=torch.float32, quantize="int8")
    ref = dequantized_reference(smollm2_converted, int8)
    del int8
    tokenizer = Tokenizer(smollm2_converted)
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(ref(torch.tensor([ids]))[0, -1].argmax()))
    new = ids[-new_tokens:]
    assert not set(new) & tokenizer.eos_ids
    assert result.stdout.rstrip("\n") == tokenizer.decode(new)
    assert f"{new_tokens} new tokens" in result.stderr


def test_bench_int8_tiny_reports_int8_bytes(tmp_path):
    out = tmp_path / "out.json"
    result = run_cli("bench.py", "--preset", "tiny", "--device", "cpu", "--quantize", "int8", "--no-compile",
                     "--new-tokens", 4, "--repeats", 1, "--sparsity", 0.5, "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["quantize"] == "int8" and "int8 weights" in result.stdout
    dense, sparse = report["rows"]
    assert dense["weight_bytes_per_token"] == weight_bytes_per_token(preset("tiny"), 4, 1.0, "int8")
    assert sparse["weight_bytes_per_token"] < dense["weight_bytes_per_token"]
    assert 1 < sparse["byte_ratio_limit"] < 1.5


def test_int8_bytes_hand_count_tiny():
    # tiny: d=64, 2 layers, 4 heads / 2 kv heads of 16, f=160, vocab 256; fp32 compute dtype.
    qkv, wo, gate, up, down = 128 * 64, 64 * 64, 160 * 64, 160 * 64, 160 * 64
    scales = 4 * (128 + 64 + 160 + 160 + 64)  # per output channel: qkv, o, gate, up (per neuron), down (per column)
    per_layer = qkv + wo + gate + up + down + scales + 4 * 2 * 64  # norms in fp32
    assert weight_bytes_per_token(preset("tiny"), 4, quantize="int8") == 2 * per_layer + 4 * (64 + 64 + 256 * 64)
    # half the neurons skipped: half of W_up, W_down^T and W_up's scales; W_down's scales stay
    half = 2 * (per_layer - (up + down) // 2 - 4 * 80) + 4 * (64 + 64 + 256 * 64)
    assert weight_bytes_per_token(preset("tiny"), 4, 0.5, "int8") == half


def test_bad_quantize_is_one_line(tmp_path):
    result = run_cli("bench.py", "--preset", "tiny", "--device", "cpu", "--quantize", "int4")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown --quantize 'int4' (choose from: none, int8)"


@pytest.mark.parametrize("mode", ["dense", "uniform"])
def test_int8_decode_steps_on_kernels_equal_the_dequantized_reference(pair, monkeypatch, mode):
    """One-token decode steps through the kernels (the interpreter): the MLP's norm folded into the
    int8 CATS launches, W_o's residual added in its GEMV; against the float model of the
    dequantized weights on the torch path."""
    directory, thresholds_path, int8, ref = pair
    _set_mode((int8, ref), load_thresholds(int8, directory, thresholds_path), mode)
    idx = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    folded, kernel = [], linear.cats_mlp
    monkeypatch.setattr(linear, "cats_mlp", lambda *a, norm=None, **k: folded.append(norm is not None) or kernel(*a, norm=norm, **k))
    logits = {}
    for name, model, kernels in (("int8", int8, True), ("ref", ref, False)):
        monkeypatch.setattr(linear, "FORCE_TRITON", kernels)
        model.setup_caches(batch_size=1, max_seq_len=16)
        with torch.no_grad():
            steps = [model(idx[:, :4], torch.arange(4))[:, -1:]]
            steps += [model(idx[:, t:t + 1], torch.tensor([t])) for t in range(4, idx.shape[1])]
        logits[name] = torch.cat(steps, dim=1)
    assert rel_err(logits["int8"], logits["ref"]) < 1e-4
    assert any(folded) == (mode != "dense")  # CATS decode steps went through the folded norm
