"""Calibration: the dense model over a text in windows, recording a sample of every layer's
|SiLU(W_gate x)|, whose quantiles are the thresholds; the allocations (catsgen/allocations.py)
searched on the start of the same text; then the thresholds file (one atomic write, at the end).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from catsgen import allocations
from catsgen.errors import UserError
from catsgen.files import check_output_file
from catsgen.linear import quantize_model
from catsgen.model import DenseSiLU, Transformer, swapped_activations
from catsgen.progress import Progress
from catsgen.settings import CalibrateSettings
from catsgen.text_sample import MIX_TURN_TOKENS, text_sources, token_stream, windows
from catsgen.thresholds import LEVELS, ThresholdsTable, default_thresholds_path, model_info

logger = logging.getLogger(__name__)


# --- the statistic --------------------------------------------------------------------------------

class ActivationSample:
    """A uniform random subsample of |SiLU(W_gate x)| per layer: each value is kept with
    probability SIZE / (values expected in the run), so about SIZE values per layer are kept
    however many tokens pass (bounded memory). Thresholds are exact quantiles of the sample, so
    the fraction of all calibration values below the threshold for s has a binomial error of
    standard deviation sqrt(s(1-s)/SIZE) <= 0.0005, whatever the shape of the distribution
    (|SiLU| piles up at its minimum, 0.2785, which a histogram would have to resolve)."""

    SIZE = 1 << 20

    def __init__(self, n_layers: int, expected_per_layer: int, device=None, seed: int = 0):
        self.rate = min(1.0, self.SIZE / max(expected_per_layer, 1))
        self.parts: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def add(self, layer: int, v: torch.Tensor):
        values = v.float().abs().flatten()
        if self.rate < 1:
            keep = torch.rand(values.numel(), generator=self.generator, device=values.device) < self.rate
            values = values[keep]
        self.parts[layer].append(values)

    def thresholds(self) -> list[list[float]]:
        """[layer][level]: t with a fraction `level` of the sample at or below it, midway between
        the two neighbouring sample values (0 for level 0)."""
        return [self._layer_thresholds(torch.cat(parts).double().sort().values) for parts in self.parts]

    @staticmethod
    def _layer_thresholds(ordered: torch.Tensor) -> list[float]:
        n = ordered.numel()
        k = torch.tensor([round(level * n) for level in LEVELS], device=ordered.device)
        below, above = ordered[(k - 1).clamp(min=0)], ordered[k.clamp(max=n - 1)]
        return torch.where(k > 0, (below + above) / 2, 0.0).tolist()

    @classmethod
    def describe(cls) -> str:
        return (f"exact quantiles of a uniform random subsample of |SiLU(W_gate x)|, "
                f"about {cls.SIZE} values per layer")


class SampleRecorder(DenseSiLU):
    """The dense MLP that also records |v| into the sample."""

    def __init__(self, layer: int, sample: ActivationSample):
        super().__init__()
        self.layer, self.sample = layer, sample

    def activate(self, v):
        self.sample.add(self.layer, v)
        return v


def recording(model: Transformer, sample: ActivationSample):
    """Run the model dense, recording every layer's |v| (a context manager); the previous
    activations come back after."""
    return swapped_activations(model, lambda i, _: SampleRecorder(i, sample))


def engine_version() -> str:
    try:
        return version("catsgen")
    except PackageNotFoundError:
        return "unknown"


def calibration_record(texts: list[dict], tokens: int, seq_len: int, dtype, device, quantize: str) -> dict:
    return {"texts": texts, "tokens": tokens, "seq_len": seq_len,
            "dtype": str(dtype).removeprefix("torch."), "quantize": quantize, "device": str(device),
            "engine_version": engine_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "statistic": ActivationSample.describe()}


# --- the calibration run --------------------------------------------------------------------------

def resolve_output(checkpoint: Path, out: Path | None) -> Path:
    """Checked before any work, so that an unwritable place fails in a second, not after the run."""
    if out is None:
        if not os.access(checkpoint, os.W_OK):
            raise UserError(f"the checkpoint directory {checkpoint} is not writable: pass --out PATH "
                            "(and --thresholds PATH when you generate)")
        out = default_thresholds_path(checkpoint)
        check_output_file(out, "the thresholds file")
        return out
    check_output_file(out, "--out")
    return Path(out)


class Phases:
    """Wall time of each phase of a run, logged as each ends and summed up at the end."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        logger.info(f"  {name}: {self.seconds[name]:.1f} s")

    def summary(self) -> str:
        parts = ", ".join(f"{name} {s:.1f} s" for name, s in self.seconds.items())
        return f"calibration took {sum(self.seconds.values()):.1f} s: {parts}"


@torch.no_grad()
def calibrate(checkpoint: Path, settings: CalibrateSettings = CalibrateSettings()) -> ThresholdsTable:
    """The `calibrate` command on resolved settings (device and dtype filled in)."""
    from catsgen.checkpoint import load_model
    from catsgen.tokenizer import Tokenizer
    device, phases = settings.device or "cpu", Phases()
    out = resolve_output(Path(checkpoint), settings.out)
    sources = text_sources(settings.texts)
    if not settings.texts:
        logger.info(f"no --text given: calibrating on the built-in sample, {sources[0].name}")
    with phases("load"):
        tokenizer = Tokenizer(checkpoint)
        model = load_model(checkpoint, device=device, dtype=settings.torch_dtype())
        if settings.quantize == "int8":  # the statistics of the model that will run (fisher: its gradients)
            quantize_model(model)
    with phases("tokenize"):  # once: the statistics and the allocations read the same text
        wanted = max(settings.tokens, settings.allocation_tokens, settings.fisher_tokens)
        ids = next(windows(token_stream(sources, tokenizer, MIX_TURN_TOKENS), wanted, wanted), [])
    if not ids:
        raise UserError("the calibration text has no tokens")
    with phases("statistics"):
        sample, seen = activation_sample(model, ids[:settings.tokens], settings.seq_len)
    if seen < settings.tokens:
        logger.info(f"the text ran out after {seen} tokens, fewer than --tokens {settings.tokens}: calibrated on {seen}")
    with phases("thresholds"):
        record = calibration_record([s.record() for s in sources], seen, settings.seq_len,
                                    model.output.weight.dtype, device, settings.quantize)
        table = ThresholdsTable(model_info(model.config, checkpoint), record, sample.thresholds(), out)
    # The allocations come from the start of the same text: part of the calibration, same source.
    head = lambda n: list(windows(iter([ids[:n]]), min(settings.seq_len, n), n))  # noqa: E731
    table.allocations = {}
    if settings.allocation_tokens > 0:
        with phases("greedy allocation"):
            table.allocations["greedy"] = find_greedy(model, table, head(settings.allocation_tokens))
    if settings.fisher_tokens > 0:
        table.allocations["fisher"] = find_fisher(model, head(settings.fisher_tokens), phases)
    with phases("write"):
        table.save(out)
    half = table.for_sparsity(0.5)
    logger.info(f"wrote {out}: thresholds for sparsity 0.00..0.99 in {len(half)} layers from {seen} tokens "
                f"(at 0.50: {min(half):.4g} .. {max(half):.4g})")
    logger.info(phases.summary())
    return table


def activation_sample(model: Transformer, ids: list[int], seq_len: int) -> tuple[ActivationSample, int]:
    """The dense model over ids in windows of seq_len, recording |v|; the LM head is skipped
    (no statistic needs the logits). Returns the sample and the tokens seen."""
    device = model.output.weight.device
    sample = ActivationSample(model.config.n_layers, len(ids) * model.config.intermediate_size, device)
    seen = 0
    with recording(model, sample), Progress("statistics", len(ids)) as progress:
        for window in windows(iter([ids]), seq_len, len(ids)):
            model(torch.tensor([window], dtype=torch.long, device=device), head=False)
            seen += len(window)
            progress.update(seen)
    return sample, seen


def find_greedy(model, table: ThresholdsTable, head: list[list[int]]) -> dict:
    """The greedy allocation's file entry: how it was found and [level][layer] sparsities."""
    with Progress("allocating", model.config.n_layers, unit="layers") as progress:
        curves = allocations.layer_kl_curves(model, table.per_layer, head, progress.update)
    tokens = sum(len(w) for w in head)
    return {"method": allocations.describe(tokens), "tokens": tokens, "grid": list(allocations.GRID),
            "kl": curves, "sparsity": allocations.greedy_allocation(curves, allocations.layer_bytes(model))}


def find_fisher(model, head: list[list[int]], phases: Phases) -> dict:
    """The fisher allocation's file entry: per-neuron thresholds on a grid of levels."""
    with phases("fisher statistics"), Progress("fisher statistics", len(head), unit="windows") as progress:
        curves = allocations.fisher_curves(model, head, progress.update)
    tokens = sum(len(w) for w in head)
    with phases("fisher thresholds"):
        return {"method": allocations.describe_fisher(tokens), "tokens": tokens,
                **allocations.fisher_allocation(curves, allocations.layer_bytes(model))}


@torch.no_grad()
def calibrate_in_memory(model: Transformer, tokens: int = 512) -> ThresholdsTable:
    """Thresholds for random weights (no file can exist for them): a calibration on random
    token ids, in memory, for the benchmark."""
    logger.info(f"random weights: calibrating thresholds on {tokens} random token ids")
    device = model.output.weight.device
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator).to(device)
    sample = ActivationSample(model.config.n_layers, tokens * model.config.intermediate_size, device)
    with recording(model, sample):
        model(idx)
    record = calibration_record([{"name": "random token ids", "bytes": 0}], tokens, tokens,
                                model.output.weight.dtype, device, model.quantize)
    return ThresholdsTable(model_info(model.config, None), record, sample.thresholds())
