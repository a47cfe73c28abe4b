"""Per-token decode latency, dense against CATS, end to end: the logic behind `bench.py`."""

from __future__ import annotations

import logging
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from catsgen import cats
from catsgen.config import ModelConfig
from catsgen.errors import UserError
from catsgen.files import check_output_file, write_json_atomically
from catsgen.generate import SamplingParams, generate, make_decode_step
from catsgen.memory import check_fits, kv_cache_bytes
from catsgen.model import Transformer
from catsgen.settings import BenchSettings
from catsgen.thresholds import ThresholdsTable, check_sparsity, load_thresholds, resolve_allocation
from catsgen.parallel import ShardPlan, is_main, time_all_reduce

logger = logging.getLogger(__name__)


def weight_bytes_per_token(config: ModelConfig, element_bytes: int, mlp_active_fraction: float = 1.0,
                           quantize: str = "none", plan: ShardPlan | None = None) -> int:
    """Bytes of weights one decode step must read (on each GPU, under a tensor-parallel plan):
    every matrix once, one embedding row, and of W_up / W_down only the rows of active neurons
    (W_gate is always read whole). quantize="int8": the decoder linears cost 1 byte an entry plus
    a 4-byte scale per output channel (W_up's per neuron, skipped with its row; W_down's per
    column of W_down^T, read once); norms, the embedding row and the LM head stay in the compute dtype."""
    plan = plan or ShardPlan.make(config)
    d, f = config.dim, plan.neurons
    int8 = quantize == "int8"
    linear_bytes = 1 if int8 else element_bytes
    scale_bytes = 4 if int8 else 0
    qkv_out, o_in = plan.q_size + 2 * plan.kv_size, plan.q_size
    attention = (qkv_out * d + o_in * d) * linear_bytes + (qkv_out + d) * scale_bytes
    mlp = (f * d + 2 * f * d * mlp_active_fraction) * linear_bytes + (f + f * mlp_active_fraction + d) * scale_bytes
    per_layer = attention + mlp + 2 * d * element_bytes  # two norms
    rest = (d + d + config.vocab_size * d) * element_bytes  # embedding row, final norm, LM head
    return int(round(config.n_layers * per_layer + rest))


def byte_ratio_limit(config: ModelConfig, sparsity: float, element_bytes: int = 2, quantize: str = "none",
                     plan: ShardPlan | None = None) -> float:
    """The most a decode step can speed up at this sparsity if time were bytes read."""
    return (weight_bytes_per_token(config, element_bytes, 1.0, quantize, plan)
            / weight_bytes_per_token(config, element_bytes, 1.0 - sparsity, quantize, plan))


def check_preset_fits(preset: str, config: ModelConfig, settings: BenchSettings, element_bytes: int):
    """Weights (the whole embedding too, unless tied to the head) and the KV cache, before building."""
    embedding = 0 if config.tie_word_embeddings else (config.vocab_size - 1) * config.dim
    from catsgen.parallel import plan_for
    weights = weight_bytes_per_token(config, element_bytes, plan=plan_for(config)) + embedding * element_bytes
    cache = kv_cache_bytes(config.n_layers, settings.batch_size, settings.max_seq_len, config.n_kv_heads,
                           config.head_dim, element_bytes)
    check_fits(f"--preset {preset} (weights + KV cache for --max-seq-len {settings.max_seq_len}, batch "
               f"{settings.batch_size})", weights + cache, settings.device,
               ": try a smaller preset, --dtype bfloat16, or a smaller --max-seq-len / --batch-size")


def build_model(settings: BenchSettings, checkpoint, preset) -> Transformer:
    from catsgen.checkpoint import random_model
    from catsgen.config import preset as preset_config
    from catsgen.parallel import load_shard, plan_for
    start = time.perf_counter()
    if preset is not None:
        config, dtype = preset_config(preset), settings.torch_dtype() or torch.bfloat16
        check_preset_fits(preset, config, settings, dtype.itemsize)
        logger.info(f"building {preset} with random weights on {settings.device} ...")
        model = random_model(config, settings.device, dtype, plan=plan_for(config), quantize=settings.quantize)
    else:
        logger.info(f"loading {checkpoint} ...")
        model = load_shard(checkpoint, settings.device, settings.torch_dtype(), settings.quantize)
    model.setup_caches(settings.batch_size, settings.max_seq_len)
    logger.info(f"model ready in {time.perf_counter() - start:.1f} s")
    return model


def bench_thresholds(model: Transformer, checkpoint_dir, thresholds_path, random_weights: bool) -> ThresholdsTable:
    """The benchmark's thresholds: the checkpoint's file, or for random weights (no file can exist)
    a calibration on random token ids, done in memory."""
    from catsgen.calibrate import calibrate_in_memory
    if not random_weights:
        return load_thresholds(model, checkpoint_dir, thresholds_path)
    return calibrate_in_memory(model)


def _time_decode(model, prompt, settings: BenchSettings, step, new_tokens) -> tuple[float, float]:
    """One prefill + new_tokens decode steps; returns (prefill s, decode s per step)."""
    result = generate(model, prompt, new_tokens, SamplingParams(), eos_ids=set(),
                      decode_step=step, batch_size=settings.batch_size)
    return result.prefill_s, result.decode_s / max(result.decode_steps, 1)


def bench_one_sparsity(model, prompt, settings: BenchSettings, step, sparsity) -> dict:
    start = time.perf_counter()
    _time_decode(model, prompt, settings, step, settings.warmup_tokens)  # generate syncs at its end
    warmup_s = time.perf_counter() - start
    logger.info(f"  s={sparsity:.2f}: compile + warm-up {warmup_s:.1f} s")
    prefill, per_token = [], []
    for _ in range(settings.repeats):
        p, t = _time_decode(model, prompt, settings, step, settings.new_tokens)
        prefill.append(p)
        per_token.append(t)
    ms = [t * 1e3 for t in per_token]
    return {"sparsity": sparsity, "compile_warmup_s": warmup_s,
            "decode_ms_per_token_median": statistics.median(ms),
            "decode_ms_per_token_min": min(ms), "decode_ms_per_token_max": max(ms),
            "prefill_ms_median": statistics.median(prefill) * 1e3,
            "tokens_per_s": 1e3 / statistics.median(ms) * settings.batch_size}


def run_bench(settings: BenchSettings, checkpoint=None, preset=None, json_path: Path | None = None) -> dict:
    """The `bench` command on resolved settings (device, dtype and compile filled in)."""
    sparsities = sorted(set([0.0] + [float(s) for s in settings.sparsities]))
    for s in sparsities:
        check_sparsity(s)
    if preset is not None and settings.thresholds_path is not None:
        raise UserError("--thresholds belongs to --checkpoint: random weights are calibrated on random tokens")
    if preset is not None and settings.allocation not in (None, "uniform"):
        raise UserError(f"--allocation {settings.allocation}: a --preset (random weights, calibrated in "
                        "memory) has only the uniform allocation; use --checkpoint for greedy or fisher")
    if json_path is not None:
        check_output_file(json_path, "--json")
    torch.manual_seed(0)
    model = build_model(settings, checkpoint, preset)
    config = model.config
    prompt = torch.randint(0, config.vocab_size, (settings.prompt_len,)).tolist()
    sparse = [s for s in sparsities if s > 0]
    table = bench_thresholds(model, checkpoint, settings.thresholds_path, preset is not None) if sparse else None
    allocation = resolve_allocation(table, settings.allocation) if table is not None else None
    step = make_decode_step(settings.compile, settings.device)
    element_bytes = model.output.weight.element_size()
    # Under torchrun: one all-reduce of a block's output [B, 1, dim], alone in a loop (2 per layer).
    all_reduce_s = time_all_reduce((settings.batch_size, 1, config.dim), model.output.weight.dtype, settings.device)
    rows = []
    for s in sparsities:
        measured = 0.0
        if s > 0:
            cats.set_sparsity(model, table, s, allocation)
            measured = cats.measure_union_sparsity(model, prompt, settings.batch_size)
        elif table is not None:
            cats.set_dense(model)
        row = bench_one_sparsity(model, prompt, settings, step, s)
        bytes_read = weight_bytes_per_token(config, element_bytes, 1.0 - measured, settings.quantize, model.plan)
        row.update(measured_sparsity=measured, weight_bytes_per_token=bytes_read,
                   achieved_gb_per_s=bytes_read / (row["decode_ms_per_token_median"] * 1e-3) / 1e9,
                   byte_ratio_limit=byte_ratio_limit(config, measured, element_bytes, settings.quantize, model.plan),
                   all_reduce_share=2 * config.n_layers * all_reduce_s / (row["decode_ms_per_token_median"] * 1e-3))
        rows.append(row)
    dense_ms = rows[0]["decode_ms_per_token_median"]
    for row in rows:
        row["speedup_vs_dense"] = dense_ms / row["decode_ms_per_token_median"]
    report = {"environment": environment(settings.device), "settings": _settings_dict(settings),
              "quantize": settings.quantize, "allocation": allocation,
              "model": {"source": preset or str(checkpoint), **_shape_dict(config)}, "rows": rows,
              "tensor_parallel": {"ranks": model.plan.world, "all_reduce_us": all_reduce_s * 1e6}}
    print(format_table(report))
    if json_path is not None and is_main():
        write_json_atomically(json_path, report, indent=2, option="--json")
        logger.info(f"wrote {json_path}")
    return report


def environment(device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    on_cuda = torch.device(device).type == "cuda"
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _settings_dict(settings: BenchSettings) -> dict:
    d = asdict(settings)
    d["thresholds_path"] = str(settings.thresholds_path) if settings.thresholds_path else None
    return d


def _shape_dict(config: ModelConfig) -> dict:
    return {"architecture": config.architecture, "dim": config.dim, "n_layers": config.n_layers,
            "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "head_dim": config.head_dim,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size}


def format_table(report: dict) -> str:
    env, settings, model = report["environment"], report["settings"], report["model"]
    weights = settings["dtype"] + (" + int8 weights" if report.get("quantize") == "int8" else "")
    lines = [f"{model['source']} | {weights} | batch {settings['batch_size']} | prompt "
             f"{settings['prompt_len']} | {settings['new_tokens']} new tokens x {settings['repeats']} | "
             f"{env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
             f"{report.get('allocation') or 'no'} allocation",
             f"{'sparsity':>8} {'actual':>7} {'ms/tok':>8} {'spread':>15} {'tok/s':>8} {'MB/tok':>7} {'GB/s':>7} "
             f"{'speedup':>8} {'limit':>6} {'prefill ms':>10} {'warm-up s':>9}"]
    for r in report["rows"]:
        spread = f"{r['decode_ms_per_token_min']:.3f}-{r['decode_ms_per_token_max']:.3f}"
        lines.append(f"{r['sparsity']:>8.2f} {r['measured_sparsity']:>7.3f} "
                     f"{r['decode_ms_per_token_median']:>8.3f} {spread:>15} {r['tokens_per_s']:>8.1f} "
                     f"{r['weight_bytes_per_token'] / 1e6:>7.1f} "
                     f"{r['achieved_gb_per_s']:>7.1f} {r['speedup_vs_dense']:>7.2f}x "
                     f"{r['byte_ratio_limit']:>5.2f}x {r['prefill_ms_median']:>10.1f} {r['compile_warmup_s']:>9.1f}")
    tp = report.get("tensor_parallel", {})
    if tp.get("ranks", 1) > 1:
        shares = ", ".join(f"{r['sparsity']:.2f}: {r['all_reduce_share']:.1%}" for r in report["rows"])
        lines.append(f"tensor parallel over {tp['ranks']} ranks (GB/s and limit are per GPU): all-reduce "
                     f"{tp['all_reduce_us']:.1f} us alone, 2 per layer; share of a token ({shares})")
    return "\n".join(lines)
