"""The calibration driver: the dense model over a text in windows, recording every layer's
|SiLU(W_gate x)| sample, then the thresholds file (one write, atomic, at the very end)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from catsgen import allocation
from catsgen.cats import (ActivationSample, Thresholds, calibration_record, default_thresholds_path,
                          model_info, recording)
from catsgen.errors import UserError
from catsgen.files import check_writable_parent
from catsgen.progress import Progress
from catsgen.text_sample import text_sources, token_stream, windows

DEFAULT_TOKENS = 65536
DEFAULT_SEQ_LEN = 512
DEFAULT_ALLOCATION_TOKENS = 256  # KL curves cost 30 layers x 4 grid points forwards of these
# Fisher statistics: one forward and backward of these, and every token's per-neuron values in
# memory (tokens x intermediate_size x layers x 8 bytes: 1.5 GB for SmolLM2 at 4096).
DEFAULT_FISHER_TOKENS = 4096
DEFAULT_FISHER_SHRINK = 1.0  # allocation.shrunk: own costs only (0.5: see docs/cats.md, issue 19)


def resolve_output(checkpoint: Path, out: Path | None) -> Path:
    """Checked before any work, so that an unwritable place fails in a second, not after the run."""
    if out is None:
        if not os.access(checkpoint, os.W_OK):
            raise UserError(f"the checkpoint directory {checkpoint} is not writable: pass --out PATH "
                            "(and --thresholds PATH when you generate)")
        return default_thresholds_path(checkpoint)
    check_writable_parent(out, "--out")
    return Path(out)


@torch.no_grad()
def calibrate(checkpoint: Path, texts: list[Path] | None, max_tokens: int = DEFAULT_TOKENS,
              seq_len: int = DEFAULT_SEQ_LEN, out: Path | None = None, device="cpu",
              dtype: torch.dtype | None = None, log: Callable[[str], None] = print,
              allocation_tokens: int = DEFAULT_ALLOCATION_TOKENS,
              fisher_tokens: int = DEFAULT_FISHER_TOKENS,
              fisher_shrink: float = DEFAULT_FISHER_SHRINK) -> Thresholds:
    from catsgen.checkpoint import load_model
    from catsgen.tokenizer import Tokenizer
    out = resolve_output(Path(checkpoint), out)
    sources = text_sources(texts)
    if not texts:
        log(f"no --text given: calibrating on the built-in sample, {sources[0].name}")
    tokenizer = Tokenizer(checkpoint)
    model = load_model(checkpoint, device=device, dtype=dtype)
    sample = ActivationSample(model.config.n_layers, max_tokens * model.config.intermediate_size, device)
    progress = Progress("calibrating", max_tokens)
    seen = 0
    with recording(model, sample):
        for window in windows(token_stream(sources, tokenizer), seq_len, max_tokens):
            model(torch.tensor([window], dtype=torch.long, device=device))
            seen += len(window)
            progress.update(seen)
    progress.close()
    if seen == 0:
        raise UserError("the calibration text has no tokens")
    if seen < max_tokens:
        log(f"the text ran out after {seen} tokens, fewer than --tokens {max_tokens}: calibrated on {seen}")
    record = calibration_record([s.record() for s in sources], seen, seq_len, model.output.weight.dtype, device)
    table = Thresholds(model_info(model.config, checkpoint), record, sample.thresholds(), out)
    # The allocations come from the start of the same text: part of the calibration, same source.
    head = lambda tokens: list(windows(token_stream(sources, tokenizer), min(seq_len, tokens), tokens))  # noqa: E731
    table.allocations = {}
    if allocation_tokens > 0:
        table.allocations["greedy"] = find_allocation(model, table, head(allocation_tokens))
    if fisher_tokens > 0:
        table.allocations["fisher"] = find_fisher(model, head(fisher_tokens), fisher_shrink)
    table.save(out)
    half = table.for_sparsity(0.5)
    log(f"wrote {out}: thresholds for sparsity 0.00..0.99 in {len(half)} layers from {seen} tokens "
        f"(at 0.50: {min(half):.4g} .. {max(half):.4g})")
    return table


def find_allocation(model, table: Thresholds, head: list[list[int]]) -> dict:
    """The greedy allocation's file entry: how it was found and [level][layer] sparsities."""
    progress = Progress("allocating", model.config.n_layers, unit="layers")
    curves = allocation.layer_kl_curves(model, table.per_layer, head, progress.update)
    progress.close()
    tokens = sum(len(w) for w in head)
    return {"method": allocation.describe(tokens), "tokens": tokens, "grid": list(allocation.GRID),
            "kl": curves, "sparsity": allocation.greedy_allocation(curves, allocation.layer_bytes(model))}


def find_fisher(model, head: list[list[int]], shrink: float = DEFAULT_FISHER_SHRINK) -> dict:
    """The fisher allocation's file entry: per-neuron thresholds on a grid of levels."""
    progress = Progress("fisher statistics", len(head), unit="windows")
    curves = allocation.fisher_curves(model, head, progress.update, shrink)
    progress.close()
    tokens = sum(len(w) for w in head)
    return {"method": allocation.describe_fisher(tokens, shrink), "tokens": tokens, "shrink": shrink,
            **allocation.fisher_allocation(curves, allocation.layer_bytes(model))}
