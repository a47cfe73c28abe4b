"""Token-level perplexity, dense and at CATS sparsities, with the sparsity actually reached."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from catsgen.cats import SparsityCounter, counting, set_sparsity
from catsgen.errors import UserError
from catsgen.model import Transformer
from catsgen.progress import Progress
from catsgen.settings import PerplexitySettings
from catsgen.text_sample import text_sources, token_stream, windows
from catsgen.thresholds import check_sparsity, load_thresholds, resolve_allocation

logger = logging.getLogger(__name__)

CONVENTION = ("the text is tokenized without special tokens and cut into non-overlapping windows of "
              "--seq-len tokens (the last may be shorter); each window is an independent sequence whose "
              "first token is context only and whose other tokens are each scored given the tokens before "
              "it in the window; perplexity = exp(total negative log-likelihood / tokens scored). Numbers "
              "from other conventions (strided sliding windows, a BOS per window, ...) are not comparable.")


@torch.no_grad()
def window_nll(model: Transformer, window: list[int]) -> torch.Tensor:
    """Summed NLL (fp32) of tokens 1.. of one window, each given the tokens before it."""
    idx = torch.tensor([window], dtype=torch.long, device=model.output.weight.device)
    logits = model(idx)[0, :-1].float()
    return F.cross_entropy(logits, idx[0, 1:], reduction="sum")


def perplexity(model: Transformer, token_windows: list[list[int]], progress: Progress | None = None):
    """(perplexity, tokens scored) over the windows, with the model as it is set up."""
    nll, scored = 0.0, 0
    for window in token_windows:
        if len(window) >= 2:  # a one-token window has nothing to score
            nll += float(window_nll(model, window))
            scored += len(window) - 1
        if progress:
            progress.update(progress.done + len(window))
    return math.exp(nll / scored), scored


def sparsity_levels(sparsities: list[float]) -> list[float]:
    """Dense first, then each requested level once, in the order given."""
    for s in sparsities:
        check_sparsity(s)
    return [0.0] + [s for s in dict.fromkeys(sparsities) if s != 0]


def run_perplexity(checkpoint: Path, settings: PerplexitySettings = PerplexitySettings()) -> dict:
    """The `perplexity` command on resolved settings: dense, then every (allocation, sparsity)
    pair; allocation None = the file's best."""
    from catsgen.parallel import load_shard, merge_counts
    from catsgen.tokenizer import Tokenizer
    levels = sparsity_levels(settings.sparsities)
    device, max_tokens = settings.device or "cpu", settings.max_tokens
    sources = text_sources(settings.texts)
    tokenizer = Tokenizer(checkpoint)
    model = load_shard(checkpoint, device, settings.torch_dtype(), settings.quantize)  # torchrun: this rank's slices
    table = load_thresholds(model, checkpoint, settings.thresholds_path, levels[1]) if len(levels) > 1 else None
    if not settings.texts:
        logger.info(f"no --text given: scoring the built-in sample, {sources[0].name}")
    token_windows = list(windows(token_stream(sources, tokenizer), settings.seq_len, max_tokens))
    total = sum(len(w) for w in token_windows)
    if total - len(token_windows) < 1:
        raise UserError("the text is too short to score: it needs at least 2 tokens")
    if total < max_tokens:
        logger.info(f"the text has {total} tokens, fewer than --max-tokens {max_tokens}: scoring all of them")
    runs = [("dense", 0.0)]
    if table is not None:
        chosen = dict.fromkeys(resolve_allocation(table, a) for a in settings.allocations)
        runs += [(a, s) for a in chosen for s in levels[1:]]
    rows = []
    for allocation, s in runs:
        set_sparsity(model, table, s, allocation)
        counter = SparsityCounter(model.config.n_layers, s)
        with counting(model, counter), Progress(f"sparsity {s:.2f} {allocation}", total) as progress:
            ppl, scored = perplexity(model, token_windows, progress)
        merge_counts(counter)  # tensor parallel: each rank counted its own neurons
        # The dense pass masks nothing: its actual sparsity is 0 by definition.
        rows.append({"sparsity": s, "allocation": allocation, "perplexity": ppl,
                     "actual_sparsity": counter.overall() if s > 0 else 0.0, "tokens": scored})
    return {"checkpoint": str(checkpoint), "texts": [s.record() for s in sources],
            "tokens": total, "seq_len": settings.seq_len, "windows": len(token_windows),
            "dtype": str(model.output.weight.dtype).removeprefix("torch."), "quantize": settings.quantize,
            "device": str(device),
            "thresholds": str(table.path) if table else None, "convention": CONVENTION, "rows": rows}


def format_report(report: dict) -> str:
    texts = ", ".join(t["name"] for t in report["texts"])
    lines = [f"perplexity of {report['checkpoint']} on {texts}: {report['tokens']} tokens in "
             f"{report['windows']} windows of {report['seq_len']} ({report['dtype']}, "
             f"{'int8 weights, ' if report.get('quantize') == 'int8' else ''}{report['device']})",
             f"{'sparsity':>8}  {'allocation':>10}  {'perplexity':>10}  {'actual sparsity':>15}  {'tokens scored':>13}"]
    for r in report["rows"]:
        lines.append(f"{r['sparsity']:>8.2f}  {r['allocation']:>10}  {r['perplexity']:>10.4f}  "
                     f"{r['actual_sparsity']:>15.4f}  {r['tokens']:>13}")
    return "\n".join(lines)
