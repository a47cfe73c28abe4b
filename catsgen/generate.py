"""Prefill, the decode loop, sampling, compilation and streaming."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from catsgen.cats import SparsityCounter, measure_generation_sparsity, report_sparsity, set_dense, set_sparsity
from catsgen.errors import UserError
from catsgen.model import Transformer
from catsgen.settings import GenerateSettings
from catsgen.thresholds import load_thresholds, resolve_allocation
from catsgen.tokenizer import StreamDecoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None


def sample(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [B, V] -> next token ids [B, 1]. Sync-free, so it can live inside the graph."""
    if params.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / params.temperature
    if params.top_k is not None:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        logits = _top_p_filter(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    # Exponential-race sampling (argmax of p / Exp(1)) draws from probs without a host sync.
    noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(dim=-1, keepdim=True)


def _top_p_filter(logits, top_p):
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already cover top_p (the first always stays).
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def prefill(model: Transformer, idx: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    input_pos = torch.arange(idx.shape[1], device=idx.device)
    logits = model(idx, input_pos)
    return sample(logits[:, -1], params)


def decode_one(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor,
               params: SamplingParams) -> torch.Tensor:
    logits = model(token, input_pos)
    return sample(logits[:, -1], params)


def make_decode_step(compile: bool, device) -> Callable:
    """The per-token step. On CUDA it is compiled into one graph replayed with CUDA graphs."""
    if not compile:
        return decode_one
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
    return torch.compile(decode_one, mode=mode, fullgraph=True)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per sequence
    prompt_tokens: int
    prefill_s: float
    first_step_s: float  # the first decode step: compilation and CUDA-graph capture land here
    decode_s: float  # the decode steps after the first
    decode_steps: int  # how many steps decode_s covers

    @property
    def decode_tok_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_steps else float("nan")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: Transformer, prompt: list[int] | torch.Tensor, max_new_tokens: int,
             params: SamplingParams = SamplingParams(), eos_ids: set[int] = frozenset(),
             decode_step: Callable = decode_one, on_token: Callable[[int], None] | None = None,
             batch_size: int = 1) -> GenerationResult:
    """Prefill the prompt, then decode up to max_new_tokens tokens (stopping at EOS for
    batch 1). The caches must already be set up with room for prompt + new tokens."""
    device = model.output.weight.device
    idx = torch.as_tensor(prompt, dtype=torch.long, device=device).reshape(1, -1).repeat(batch_size, 1)
    T = idx.shape[1]
    if T + max_new_tokens > model.max_seq_len:
        raise UserError(f"prompt ({T} tokens) + max new tokens ({max_new_tokens}) exceeds "
                        f"--max-seq-len {model.max_seq_len}")
    _sync(device)
    start = time.perf_counter()
    token = prefill(model, idx, params)
    _sync(device)
    prefill_s = time.perf_counter() - start
    out = [token]
    if on_token:
        on_token(int(token[0, 0]))  # streaming needs the value; the sync is part of streaming
    stop_at_eos = batch_size == 1 and bool(eos_ids)
    input_pos = torch.tensor([T], device=device)
    start = time.perf_counter()
    first_step_s = 0.0
    while len(out) < max_new_tokens:
        if stop_at_eos and int(out[-1][0, 0]) in eos_ids:
            break
        token = decode_step(model, out[-1].clone(), input_pos, params).clone()
        input_pos += 1
        out.append(token)
        if on_token:
            on_token(int(token[0, 0]))
        if len(out) == 2:  # time the steady state apart from the first step
            _sync(device)
            first_step_s, start = time.perf_counter() - start, time.perf_counter()
    _sync(device)
    decode_s = time.perf_counter() - start
    tokens = torch.cat(out, dim=1).tolist()
    if stop_at_eos:
        tokens = [_cut_after_eos(tokens[0], eos_ids)]
    return GenerationResult(tokens, T, prefill_s, first_step_s, decode_s, max(len(out) - 2, 0))


def _cut_after_eos(tokens: list[int], eos_ids) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


def load_for_generation(checkpoint, device, dtype, batch_size: int, max_seq_len: int, quantize: str = "none"):
    """Model with caches set up, plus its tokenizer."""
    from catsgen.config import ModelConfig
    from catsgen.parallel import load_shard
    from catsgen.tokenizer import Tokenizer
    ModelConfig.from_checkpoint(checkpoint)  # first: it names a bad directory best
    tokenizer = Tokenizer(checkpoint)
    model = load_shard(checkpoint, device, dtype, quantize)  # under torchrun: this rank's slices only
    model.setup_caches(batch_size, max_seq_len)
    return model, tokenizer


def apply_sparsity(model: Transformer, checkpoint_dir, sparsity: float, thresholds_path=None,
                   allocation: str | None = None) -> SparsityCounter | None:
    """Set the model up for `sparsity`; returns a counter for measure_generation_sparsity, or None
    at s = 0, where the model stays exactly dense (no thresholds file needed)."""
    if sparsity == 0:
        set_dense(model)
        return None
    table = load_thresholds(model, checkpoint_dir, thresholds_path, sparsity)
    allocation = resolve_allocation(table, allocation)
    set_sparsity(model, table, sparsity, allocation)
    logger.info(f"[CATS sparsity {sparsity:.2f}, {allocation} allocation: thresholds from {table.path}, "
                f"{table.describe()}]")
    return SparsityCounter(model.config.n_layers, sparsity)


def decode_path(device, sparsity: float, compile: bool) -> str:
    """Which code ran the decode steps, for the summary: a CPU number is not the GPU's."""
    if torch.device(device).type == "cuda":
        mlp = "Triton CATS MLP" if sparsity > 0 else "cuBLAS MLP"
        path = f"kernels: {mlp} + Triton decode attention"
    else:
        skipped = ", CATS skipping W_down rows (and W_up rows in sparse layers)"
        path = "torch (CPU)" + (skipped if sparsity > 0 else "")
    return path + (", compiled" if compile else ", eager")


def run_generation(checkpoint, settings: GenerateSettings, out=None) -> GenerationResult:
    """The `generate` command on resolved settings: stream the continuation to `out`, a summary
    to the log."""
    import sys
    out = out or sys.stdout
    device, max_seq_len, compile = settings.device or "cpu", settings.max_seq_len, bool(settings.compile)
    torch.manual_seed(settings.seed)
    model, tokenizer = load_for_generation(checkpoint, device, settings.torch_dtype(), 1, max_seq_len,
                                           settings.quantize)
    counter = apply_sparsity(model, checkpoint, settings.sparsity, settings.thresholds_path, settings.allocation)
    text = tokenizer.apply_chat_template(settings.prompt) if settings.chat else settings.prompt
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the prompt encodes to zero tokens")
    if len(ids) >= max_seq_len:
        raise UserError(f"the prompt is {len(ids)} tokens, longer than --max-seq-len {max_seq_len}")
    max_new_tokens = min(settings.max_new_tokens, max_seq_len - len(ids))
    if max_new_tokens < settings.max_new_tokens:
        logger.warning(f"--max-new-tokens {settings.max_new_tokens} cut to {max_new_tokens}: the prompt "
                       f"({len(ids)} tokens) and the new tokens must fit --max-seq-len {max_seq_len}")
    stream = StreamDecoder(tokenizer)

    def on_token(token_id):
        if token_id not in tokenizer.eos_ids:
            out.write(stream.push(token_id))
            out.flush()

    params = SamplingParams(settings.temperature, settings.top_k, settings.top_p)
    result = generate(model, ids, max_new_tokens, params, tokenizer.eos_ids, make_decode_step(compile, device), on_token)
    out.write(stream.flush() + "\n")
    logger.info(f"[{len(ids)} prompt tokens, {len(result.tokens[0])} new tokens, prefill "
                f"{result.prefill_s * 1e3:.1f} ms, first decode step {result.first_step_s * 1e3:.1f} ms"
                f"{' (compilation)' if compile else ''}, then {result.decode_tok_per_s:.1f} tok/s; "
                f"{decode_path(device, settings.sparsity, compile)}]")
    if counter is not None:
        # Measured by a separate reference forward, so the decode loop carries no counting.
        logger.info(report_sparsity(measure_generation_sparsity(model, ids, result.tokens[0], counter)))
    return result
