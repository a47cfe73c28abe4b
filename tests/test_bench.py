"""bench.py on CPU: the JSON report's fields, and the bytes-per-token arithmetic by hand."""

import json

import pytest

from catsgen.bench import byte_ratio_limit, weight_bytes_per_token
from catsgen.config import preset
from catsgen.parallel import ShardPlan
from conftest import run_cli


def test_weight_bytes_hand_count_tiny():
    # tiny: d=64, 2 layers, 4 heads / 2 kv heads of 16, f=160, vocab 256.
    qkv, wo = (4 + 2 + 2) * 16 * 64, 64 * 64
    gate, up, down = 160 * 64, 160 * 64, 160 * 64
    norms = 2 * 64
    per_layer_dense = qkv + wo + gate + up + down + norms           # 43136
    dense = 2 * per_layer_dense + 64 + 64 + 256 * 64                # embedding row, final norm, head
    assert dense == 102784
    assert weight_bytes_per_token(preset("tiny"), 4) == dense * 4
    half = 2 * (qkv + wo + gate + (up + down) // 2 + norms) + 64 + 64 + 256 * 64
    assert weight_bytes_per_token(preset("tiny"), 2, mlp_active_fraction=0.5) == half * 2


def test_byte_ratio_limit_llama2_matches_design():
    # DESIGN.md: the byte-ratio limit with a dense gate is 1.28x at s=0.5 for Llama-2-7B.
    assert byte_ratio_limit(preset("llama-2-7b"), 0.5) == pytest.approx(1.28, abs=0.01)
    assert byte_ratio_limit(preset("llama-2-7b"), 0.0) == 1.0


def test_bench_tiny_cpu_writes_every_field(tmp_path):
    out = tmp_path / "out.json"
    result = run_cli("bench.py", "--preset", "tiny", "--device", "cpu", "--new-tokens", 8,
                     "--repeats", 2, "--sparsity", 0.5, "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    for key in ("device", "device_name", "torch", "triton"):
        assert key in report["environment"]
    assert report["settings"]["dtype"] == "float32"
    assert report["model"]["intermediate_size"] == 160
    sparsities = [row["sparsity"] for row in report["rows"]]
    assert sparsities == [0.0, 0.5]
    for row in report["rows"]:
        for key in ("decode_ms_per_token_median", "decode_ms_per_token_min", "decode_ms_per_token_max",
                    "prefill_ms_median", "tokens_per_s", "achieved_gb_per_s", "speedup_vs_dense",
                    "byte_ratio_limit", "compile_warmup_s", "measured_sparsity", "weight_bytes_per_token"):
            assert row[key] >= 0, key
    assert report["rows"][0]["speedup_vs_dense"] == 1.0
    assert 0.3 < report["rows"][1]["measured_sparsity"] < 0.7
    assert "0.50" in result.stdout and "GB/s" in result.stdout
    assert "calibrat" in result.stderr  # says where random-weight thresholds come from


def test_bench_rejects_bad_sparsity(tmp_path):
    result = run_cli("bench.py", "--preset", "tiny", "--device", "cpu", "--sparsity", 1.5)
    assert result.returncode == 2 and "outside [0, 0.99]" in result.stderr


def test_several_values_after_one_flag():
    from catsgen.cli import expand_multi_value_options
    assert expand_multi_value_options(["bench", "--sparsity", "0", "0.5", "--repeats", "3"]) == \
        ["bench", "--sparsity", "0", "--sparsity", "0.5", "--repeats", "3"]
    # generate takes one sparsity: its arguments are left alone
    assert expand_multi_value_options(["generate", "--sparsity", "0.5", "--prompt", "x"]) == \
        ["generate", "--sparsity", "0.5", "--prompt", "x"]


def test_weight_bytes_per_gpu_under_tensor_parallelism():
    c = preset("llama-2-70b")
    d, f, L, V = c.dim, c.intermediate_size, c.n_layers, c.vocab_size
    matrices = (2 * 64 + 2 * 8) * 128 * d + 3 * f * d  # q, o, k, v; gate, up, down
    assert weight_bytes_per_token(c, 2) == 2 * (L * (matrices + 2 * d) + 2 * d + V * d)  # about 138 GB
    # Each of 8 GPUs reads an eighth of every layer's matrices, all the (replicated) rest.
    per_gpu = weight_bytes_per_token(c, 2, plan=ShardPlan.make(c, 3, 8))
    assert per_gpu == 2 * (L * (matrices // 8 + 2 * d) + 2 * d + V * d)
