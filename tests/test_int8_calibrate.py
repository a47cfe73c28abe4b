"""Calibrating on the int8 model: the int8 GEMV op's backward (x only) equals the dequantized float
linear's, so the fisher allocation's backward runs through the int8 decoder on the CPU and finds
the gradients of the dequantized model; `calibrate --quantize int8` writes a valid file that says so."""

import json

import pytest
import torch
import torch.nn.functional as F

from catsgen import allocations
from catsgen.checkpoint import load_model
from catsgen.kernels import int8_gemv
from catsgen.quantize import quantize_int8
from catsgen.thresholds import ThresholdsTable
from conftest import run_cli
from helpers_cats import run_main
from test_int8_model import dequantized_reference


def random_int8(n=37, k=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_int8(torch.randn(n, k, generator=g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_gemv_x_gradient_is_the_dequantized_linears(dtype):
    q, scale = random_int8()
    w = (q.float() * scale[:, None]).to(dtype)
    x = torch.randn(2, 3, q.shape[1], dtype=dtype, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 3, q.shape[0], dtype=dtype, generator=torch.Generator().manual_seed(2))
    grads = []
    for apply in (lambda x: int8_gemv(x, q, scale), lambda x: F.linear(x, w)):
        x_ = x.clone().requires_grad_()
        (apply(x_) * weights).float().sum().backward()
        grads.append(x_.grad)
    assert grads[0].dtype == dtype and grads[0].shape == x.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grads[0].float(), grads[1].float(), rtol=tolerance, atol=tolerance)


def test_int8_gemv_autograd_registration_passes_opcheck():
    """torch's own checks of the op: schema, fake tensor, autograd registration (q, scale: no grad)."""
    q, scale = random_int8(9, 7)
    x = torch.randn(3, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.catsgen.int8_gemv.default, (x, q, scale))


def test_fisher_backward_through_int8_equals_the_dequantized_model(pair_int8):
    """The whole backward (attention and MLP linears int8) against autograd on the float model
    holding the dequantized weights: same per-neuron |v| curves and fisher costs."""
    int8, reference = pair_int8
    windows = [list(range(3, 67)), list(range(100, 164))]
    got, expected = (allocations.fisher_curves(m, windows) for m in (int8, reference))
    for (t_got, c_got), (t_exp, c_exp) in zip(got, expected, strict=True):
        torch.testing.assert_close(t_got, t_exp, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c_got, c_exp, rtol=1e-3, atol=1e-9 * float(c_exp.max()))


@pytest.fixture(scope="module")
def pair_int8(checkpoints):
    directory = checkpoints["gqa"][0]
    int8 = load_model(directory, dtype=torch.float32, quantize="int8")
    return int8, dequantized_reference(directory, int8)


def test_calibrate_int8_through_the_cli_writes_a_valid_file(checkpoints, tmp_path, capsys):
    directory = checkpoints["gqa"][0]
    out = tmp_path / "int8.json"
    code, _, err = run_main(capsys, "calibrate", "--checkpoint", directory, "--out", out, "--device", "cpu",
                            "--quantize", "int8", "--tokens", 256, "--seq-len", 128,
                            "--allocation-tokens", 64, "--fisher-tokens", 128)
    assert code == 0, err
    table = ThresholdsTable.load(out)
    assert table.calibration["quantize"] == "int8" and "(int8 model)" in table.describe()
    assert table.has_neuron_thresholds("fisher") and "greedy" in table.allocations
    # not the float model's thresholds: the int8 model's activations differ slightly
    float_table = calibrated_float(directory, tmp_path, capsys)
    assert float_table.calibration["quantize"] == "none" and "int8" not in float_table.describe()
    assert table.per_layer != float_table.per_layer
    torch.testing.assert_close(torch.tensor(table.per_layer), torch.tensor(float_table.per_layer), rtol=0.1, atol=0.02)


def calibrated_float(directory, tmp_path, capsys) -> ThresholdsTable:
    out = tmp_path / "float.json"
    code, _, err = run_main(capsys, "calibrate", "--checkpoint", directory, "--out", out, "--device", "cpu",
                            "--tokens", 256, "--seq-len", 128, "--allocation-tokens", 0, "--fisher-tokens", 0)
    assert code == 0, err
    return ThresholdsTable.load(out)


def test_file_without_quantize_still_loads(calibrated, tmp_path):
    """Files made before --quantize existed were calibrated on the float model."""
    path, old = calibrated[1], tmp_path / "old.json"
    data = json.loads(path.read_text())
    assert data["calibration"].pop("quantize") == "none"
    old.write_text(json.dumps(data))
    table = ThresholdsTable.load(old)
    assert "quantize" not in table.calibration and "int8" not in table.describe()
    assert table.per_layer == ThresholdsTable.load(path).per_layer


def test_bad_quantize_on_calibrate_is_one_line(tmp_path):
    result = run_cli("calibrate.py", "--quantize", "int4", "--out", tmp_path / "t.json")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown --quantize 'int4' (choose from: none, int8)"
    assert not (tmp_path / "t.json").exists()
