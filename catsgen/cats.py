"""CATS (arXiv 2404.08763): the thresholded MLP activation, its calibration statistics, the
thresholds file, and measuring the sparsity a run actually got.

CATS_t(v) = v where |v| > t, else 0, applied to v = SiLU(W_gate x), one threshold t per layer
(or, with the fisher allocation, one per neuron). The threshold for sparsity s is the s-quantile
of |v| on a calibration text (dense model).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from catsgen.errors import UserError
from catsgen.files import write_json_atomically
from catsgen.model import DenseSiLU, Transformer

THRESHOLDS_FILENAME = "cats_thresholds.json"
FILE_FORMAT = "catsgen-cats-thresholds"
FILE_VERSION = 1
LEVELS = [round(i / 100, 2) for i in range(100)]  # 0.00, 0.01, ..., 0.99
MAX_SPARSITY = LEVELS[-1]
# How the target sparsity is spread over layers (catsgen/allocation.py finds "greedy"), and
# over neurons ("fisher": per-neuron thresholds); best last.
ALLOCATIONS = ("uniform", "greedy", "fisher")
# Decode steps (at most this many tokens) go to the Triton kernel on CUDA; prefill stays in torch.
KERNEL_MAX_TOKENS = 8
CALIBRATE_HINT = "make one for this checkpoint with `python calibrate.py --checkpoint DIR` (or `catsgen calibrate`)"


# --- the activation -----------------------------------------------------------------------------

class CATS(DenseSiLU):
    """Plugs into MLP.activation. The threshold is a float32 buffer (0-d, or [F] per neuron): a new
    sparsity is written into it in place, so a compiled decode step (and its CUDA graph) is
    reused, not recompiled."""

    def __init__(self, layer: int, threshold: float | torch.Tensor, device=None):
        super().__init__()
        self.layer = layer
        self.register_buffer("threshold", torch.as_tensor(threshold, dtype=torch.float32).to(device).clone())
        self.counter: SparsityCounter | None = None  # set only during a measuring forward

    def forward(self, x, w_gate, w_up, w_down_t):
        tokens = x.numel() // x.shape[-1]
        if x.is_cuda and tokens <= KERNEL_MAX_TOKENS and self.counter is None:
            from catsgen.kernels import cats_mlp  # Triton; imported only where it runs
            return cats_mlp(x.reshape(tokens, x.shape[-1]), w_gate, w_up, w_down_t, self.threshold).view(x.shape)
        return super().forward(x, w_gate, w_up, w_down_t)

    def activate(self, v):
        # Compared in fp32 whatever the model dtype, as calibration measured |v| in fp32.
        keep = v.float().abs() > self.threshold
        if self.counter is not None:
            self.counter.add(self.layer, keep)
        return torch.where(keep, v, 0)


def set_dense(model: Transformer):
    for mlp in model.mlps:
        mlp.activation = DenseSiLU()


def set_thresholds(model: Transformer, thresholds: list[float] | list[torch.Tensor]):
    """Install CATS in every layer (a threshold per layer, or an [F] vector per layer: one per
    neuron), or update the thresholds in place where a CATS of that shape already is."""
    device = model.output.weight.device
    for i, (mlp, t) in enumerate(zip(model.mlps, thresholds, strict=True)):
        t = model.plan.local_thresholds(torch.as_tensor(t, dtype=torch.float32))  # this rank's neurons
        if isinstance(mlp.activation, CATS) and mlp.activation.threshold.shape == t.shape:
            mlp.activation.threshold.copy_(t)
        else:
            mlp.activation = CATS(i, t, device)


def set_sparsity(model: Transformer, table: "Thresholds", sparsity: float, allocation: str = "uniform"):
    """Dense at s = 0 (bit-identical to the plain model), CATS with the table's thresholds otherwise."""
    check_sparsity(sparsity)
    if sparsity == 0:
        set_dense(model)
    elif table.has_neuron_thresholds(allocation):
        set_thresholds(model, table.neuron_thresholds(sparsity, allocation))
    else:
        set_thresholds(model, table.for_sparsity(sparsity, allocation))


def check_sparsity(sparsity: float):
    if not 0 <= sparsity <= MAX_SPARSITY:  # also rejects NaN
        raise UserError(f"--sparsity {sparsity} is outside [0, {MAX_SPARSITY}]")


# --- measured sparsity ----------------------------------------------------------------------------

class SparsityCounter:
    """Per-layer counts of zeroed activations in a measuring forward, kept on the device.
    start: positions before it are not counted. union: a neuron counts as zeroed at a position
    only if it is zero for every sequence of the batch (what a batched kernel can skip)."""

    def __init__(self, n_layers: int, sparsity: float, start: int = 0, union: bool = False):
        self.sparsity, self.start, self.union = sparsity, start, union
        self.zeroed = [0] * n_layers
        self.total = [0] * n_layers

    def add(self, layer: int, keep: torch.Tensor):
        keep = keep[:, self.start:]  # [B, T, f]
        if self.union:
            keep = keep.any(dim=0)
        self.zeroed[layer] += keep.numel() - keep.sum()
        self.total[layer] += keep.numel()

    def per_layer(self) -> list[float]:
        return [float(z) / t if t else float("nan") for z, t in zip(self.zeroed, self.total)]

    def overall(self) -> float:
        total = sum(self.total)
        return float(sum(self.zeroed)) / total if total else float("nan")


@contextmanager
def counting(model: Transformer, counter: SparsityCounter):
    """Count zeroed activations in the forwards inside; CATS takes its torch path meanwhile."""
    activations = [mlp.activation for mlp in model.mlps if isinstance(mlp.activation, CATS)]
    for a in activations:
        a.counter = counter
    try:
        yield counter
    finally:
        for a in activations:
            a.counter = None


@torch.no_grad()
def measure_sparsity(model: Transformer, idx: torch.Tensor, counter: SparsityCounter) -> SparsityCounter:
    """One plain forward (no KV cache) over idx [B, T], counting; kept out of the decode hot path."""
    with counting(model, counter):
        model(idx.to(model.output.weight.device))
    from catsgen.parallel import merge_counts
    return merge_counts(counter)  # tensor parallel: each rank counted its own neurons


def measure_generation_sparsity(model: Transformer, prompt: list[int], new: list[int],
                                counter: SparsityCounter) -> SparsityCounter:
    """Sparsity over the positions whose outputs chose the new tokens: the last prompt position
    and every new token but the last, the same inputs the decode loop fed through the MLPs."""
    counter.start = len(prompt) - 1
    return measure_sparsity(model, torch.tensor([(prompt + new)[:-1]]), counter)


def measure_union_sparsity(model: Transformer, prompt: list[int], batch_size: int) -> float:
    """For the benchmark: over the prompt fed as a batch of batch_size, the fraction of
    (position, neuron) pairs zero in every sequence, i.e. rows a batched decode step skips."""
    counter = SparsityCounter(model.config.n_layers, float("nan"), union=True)
    return measure_sparsity(model, torch.tensor([prompt]).repeat(batch_size, 1), counter).overall()


def report_sparsity(counter: SparsityCounter) -> str:
    per_layer = counter.per_layer()
    rows = [" ".join(f"{s:.3f}" for s in per_layer[i:i + 10]) for i in range(0, len(per_layer), 10)]
    layers = "\n".join(f"  layers {i * 10:>3}-{min(i * 10 + 9, len(per_layer) - 1):<3} {row}"
                       for i, row in enumerate(rows))
    return (f"[CATS sparsity: target {counter.sparsity:.2f}, measured {counter.overall():.3f} overall "
            f"(reference forward over the positions that chose the new tokens); per layer:]\n{layers}")


# --- calibration statistics -----------------------------------------------------------------------

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


@contextmanager
def recording(model: Transformer, sample: ActivationSample):
    """Run the model dense, recording every layer's |v|; the previous activations come back after."""
    previous = [mlp.activation for mlp in model.mlps]
    for i, mlp in enumerate(model.mlps):
        mlp.activation = SampleRecorder(i, sample)
    try:
        yield sample
    finally:
        for mlp, activation in zip(model.mlps, previous):
            mlp.activation = activation


# --- the thresholds file --------------------------------------------------------------------------

def default_thresholds_path(checkpoint_dir) -> Path:
    return Path(checkpoint_dir) / THRESHOLDS_FILENAME


def checkpoint_fingerprint(checkpoint_dir, samples: int = 64, sample_bytes: int = 64) -> str:
    """sha256 over each safetensors file's header (names, dtypes, shapes, offsets) and a few bytes
    sampled at evenly spaced offsets of its data. Reads a few KB, not the weights, and depends on
    the files only: not on the dtype or device the model is loaded with."""
    from catsgen.checkpoint import checkpoint_files
    digest = hashlib.sha256()
    for file in sorted(set(checkpoint_files(Path(checkpoint_dir)).values())):
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(file.name.encode() + f.read(header_len))
            data_start, data_len = 8 + header_len, file.stat().st_size - 8 - header_len
            for i in range(samples):
                f.seek(data_start + data_len * i // samples)
                digest.update(f.read(sample_bytes))
    return digest.hexdigest()[:16]


def model_info(config, checkpoint_dir) -> dict:
    """What a thresholds file records about its model; None fingerprint for random weights."""
    return {"architecture": config.architecture, "n_layers": config.n_layers,
            "intermediate_size": config.intermediate_size, "hidden_size": config.dim,
            "fingerprint": checkpoint_fingerprint(checkpoint_dir) if checkpoint_dir is not None else None}


def engine_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("catsgen")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class Thresholds:
    """Per layer, the threshold for every level 0.00..0.99, and the model and text that made them."""
    model: dict
    calibration: dict
    per_layer: list[list[float]]  # [layer][level]
    path: Path | None = None

    allocations: dict | None = None  # name -> {"sparsity": [level][layer], how it was found}

    def layer_sparsities(self, sparsity: float, allocation: str = "uniform") -> list[float]:
        """Each layer's sparsity for the target: the same everywhere (uniform), or the file's
        allocation for the two neighbouring levels, interpolated (same byte-weighted mean)."""
        if allocation == "uniform":
            return [sparsity] * len(self.per_layer)
        if allocation not in (self.allocations or {}):
            raise UserError(f"{self.path} has no {allocation!r} allocation (calibrated before allocations "
                            f"existed?): use --allocation uniform, or {CALIBRATE_HINT}")
        per_level = self.allocations[allocation]["sparsity"]
        return [interpolate(column, sparsity) for column in zip(*per_level)]

    def for_sparsity(self, sparsity: float, allocation: str = "uniform") -> list[float]:
        """Each layer's threshold at its sparsity, interpolated between 0.01 levels."""
        return [interpolate(row, s) for row, s in
                zip(self.per_layer, self.layer_sparsities(sparsity, allocation), strict=True)]

    def has_neuron_thresholds(self, allocation: str) -> bool:
        return "neuron_thresholds" in (self.allocations or {}).get(allocation, {})

    def neuron_thresholds(self, sparsity: float, allocation: str) -> list[torch.Tensor]:
        """Per layer, an [F] threshold vector: linear between the allocation's grid levels, from 0
        (dense) below the first and towards the uniform 0.99 thresholds above the last."""
        entry = self.allocations[allocation]
        points = [0.0, *entry["grid"], MAX_SPARSITY]
        k, _ = bracket(points, sparsity)
        layers = []
        for layer, row in enumerate(self.per_layer):
            ends = {j: self._grid_vector(entry, row, j, layer) for j in (k, k + 1)}  # only the two used
            layers.append(interpolate_between(points, ends, sparsity))
        return layers

    def _grid_vector(self, entry: dict, row: list[float], j: int, layer: int) -> torch.Tensor:
        n = self.model["intermediate_size"]
        if j == 0:
            return torch.zeros(n)
        if j > len(entry["grid"]):
            return torch.full((n,), row[-1])
        return torch.tensor(entry["neuron_thresholds"][j - 1][layer])

    def default_allocation(self) -> str:
        """The best allocation this file has (measured: fisher, then greedy, then uniform)."""
        return next(a for a in reversed(ALLOCATIONS) if a == "uniform" or a in (self.allocations or {}))

    def check_model(self, info: dict):
        for key in ("architecture", "n_layers", "intermediate_size", "hidden_size"):
            if self.model.get(key) != info[key]:
                raise UserError(f"{self.path} was calibrated for another model ({key} "
                                f"{self.model.get(key)} there, {info[key]} here): {CALIBRATE_HINT}")
        if info["fingerprint"] is not None and self.model.get("fingerprint") != info["fingerprint"]:
            raise UserError(f"{self.path} was calibrated for other weights (fingerprint "
                            f"{self.model.get('fingerprint')} there, {info['fingerprint']} here): {CALIBRATE_HINT}")

    def describe(self) -> str:
        c = self.calibration
        texts = ", ".join(t["name"] for t in c.get("texts", [])) or "?"
        return f"calibrated on {c.get('tokens')} tokens of {texts} on {c.get('date', '?')[:10]}"

    def to_json(self) -> dict:
        data = {"format": FILE_FORMAT, "version": FILE_VERSION, "model": self.model,
                "calibration": self.calibration, "levels": LEVELS, "thresholds": self.per_layer}
        if self.allocations:
            data["allocations"] = self.allocations
        return data

    def save(self, path: Path):
        write_json_atomically(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> "Thresholds":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is not a readable thresholds file ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise UserError(f"{path} is not a catsgen thresholds file (no \"format\": \"{FILE_FORMAT}\")")
        if data.get("version") != FILE_VERSION:
            raise UserError(f"{path} has thresholds file version {data.get('version')}; this catsgen "
                            f"reads version {FILE_VERSION}: {CALIBRATE_HINT}")
        table = cls(data.get("model", {}), data.get("calibration", {}), data.get("thresholds"), Path(path),
                    data.get("allocations"))
        n_layers = table.model.get("n_layers")
        if (data.get("levels") != LEVELS or not _is_table(table.per_layer, n_layers, len(LEVELS))
                or not all(isinstance(a, dict) and _is_table(a.get("sparsity"), len(LEVELS), n_layers)
                           and _neuron_tables_ok(a, n_layers, table.model.get("intermediate_size"))
                           for a in (table.allocations or {}).values())):
            raise UserError(f"{path} is damaged: expected {len(LEVELS)} thresholds per layer for "
                            f"{n_layers} layers (and {len(LEVELS)} x {n_layers} sparsities per allocation)")
        return table


def _neuron_tables_ok(entry: dict, n_layers: int, n_neurons: int) -> bool:
    if "neuron_thresholds" not in entry:
        return True
    grid, tables = entry.get("grid"), entry["neuron_thresholds"]
    return (isinstance(grid, list) and len(grid) > 0 and grid == sorted(grid) and 0 < grid[0]
            and grid[-1] < MAX_SPARSITY and isinstance(tables, list) and len(tables) == len(grid)
            and all(_is_table(t, n_layers, n_neurons) for t in tables))


def _is_table(rows, n_rows: int, n_columns: int) -> bool:
    return (isinstance(rows, list) and len(rows) == n_rows
            and all(isinstance(row, list) and len(row) == n_columns for row in rows))


def bracket(points: list[float], x: float) -> tuple[int, float]:
    """(k, frac): x lies frac of the way from points[k] to points[k + 1] (points ascending)."""
    k = max(i for i, p in enumerate(points[:-1]) if p <= x + 1e-9)
    return k, (x - points[k]) / (points[k + 1] - points[k])


def interpolate_between(points: list[float], values, x: float):
    """values at x, linear between the two neighbouring points (points ascending, x within them)."""
    k, frac = bracket(points, x)
    return values[k] + (values[k + 1] - values[k]) * frac


def interpolate(row: list[float], sparsity: float) -> float:
    """row[level] at a sparsity between levels: linear between the two neighbouring 0.01 levels."""
    return interpolate_between(LEVELS, row, sparsity)


def calibration_record(texts: list[dict], tokens: int, seq_len: int, dtype, device) -> dict:
    return {"texts": texts, "tokens": tokens, "seq_len": seq_len,
            "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "engine_version": engine_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "statistic": ActivationSample.describe()}


# --- choosing thresholds at run time --------------------------------------------------------------

def load_thresholds(model: Transformer, checkpoint_dir, path=None, sparsity: float | None = None) -> Thresholds:
    """The thresholds file for this checkpoint (default: next to it), checked against the model."""
    if path is not None and not Path(path).is_file():
        raise UserError(f"thresholds file {path} does not exist: {CALIBRATE_HINT}")
    path = Path(path) if path is not None else default_thresholds_path(checkpoint_dir)
    if not path.is_file():
        needs = f"--sparsity {sparsity}" if sparsity is not None else "CATS"
        raise UserError(f"{needs} needs a thresholds file and there is none at {path}: "
                        f"{CALIBRATE_HINT.replace('DIR', str(checkpoint_dir))}, or pass --thresholds PATH")
    table = Thresholds.load(path)
    table.check_model(model_info(model.config, checkpoint_dir))
    return table


def check_allocation(allocation: str | None):
    if allocation is not None and allocation not in ALLOCATIONS:
        raise UserError(f"--allocation {allocation!r}: choose {', '.join(ALLOCATIONS[:-1])} or {ALLOCATIONS[-1]}")


def resolve_allocation(table: "Thresholds", allocation: str | None) -> str:
    """The requested allocation, checked against the file; None = the best the file has."""
    check_allocation(allocation)
    allocation = allocation or table.default_allocation()
    table.layer_sparsities(0.5, allocation)  # a clear error now if the file lacks it
    return allocation


def apply_sparsity(model: Transformer, checkpoint_dir, sparsity: float, thresholds, log: Callable[[str], None],
                   allocation: str | None = None):
    """Set the model up for `sparsity`; returns a counter for measure_generation_sparsity, or None
    at s = 0, where the model stays exactly dense (no thresholds file needed)."""
    check_sparsity(sparsity)
    check_allocation(allocation)
    if sparsity == 0:
        set_dense(model)
        return None
    table = load_thresholds(model, checkpoint_dir, thresholds, sparsity)
    allocation = resolve_allocation(table, allocation)
    set_sparsity(model, table, sparsity, allocation)
    log(f"[CATS sparsity {sparsity:.2f}, {allocation} allocation: thresholds from {table.path}, {table.describe()}]")
    return SparsityCounter(model.config.n_layers, sparsity)


@torch.no_grad()
def bench_thresholds(model: Transformer, checkpoint_dir, path, random_weights: bool, log) -> Thresholds:
    """The benchmark's thresholds: the checkpoint's file, or for random weights (no file can exist)
    a calibration on random token ids, done here in memory."""
    if not random_weights:
        return load_thresholds(model, checkpoint_dir, path)
    if path is not None:
        raise UserError("--thresholds belongs to --checkpoint: random weights are calibrated on random tokens")
    tokens = 512
    log(f"random weights: calibrating thresholds on {tokens} random token ids")
    device = model.output.weight.device
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator).to(device)
    sample = ActivationSample(model.config.n_layers, tokens * model.config.intermediate_size, device)
    with recording(model, sample):
        model(idx)
    record = calibration_record([{"name": "random token ids", "bytes": 0}], tokens, tokens,
                                model.output.weight.dtype, device)
    return Thresholds(model_info(model.config, None), record, sample.thresholds())
