"""The thresholds file: its format, validation, interpolation between levels, and loading it for
a model (checked against the model's shape and weights fingerprint).

One file holds, per layer, the CATS threshold for every sparsity level 0.00..0.99, and optionally
allocations: how a target sparsity is spread over layers ("greedy") or neurons ("fisher").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from catsgen.errors import UserError
from catsgen.files import write_json_atomically

if TYPE_CHECKING:
    import torch

THRESHOLDS_FILENAME = "cats_thresholds.json"
FILE_FORMAT = "catsgen-cats-thresholds"
FILE_VERSION = 1
LEVELS = [round(i / 100, 2) for i in range(100)]  # 0.00, 0.01, ..., 0.99
MAX_SPARSITY = LEVELS[-1]
# How the target sparsity is spread over layers (catsgen/allocations.py finds "greedy"), and
# over neurons ("fisher": per-neuron thresholds); best last.
ALLOCATIONS = ("uniform", "greedy", "fisher")
CALIBRATE_HINT = "make one for this checkpoint with `python calibrate.py --checkpoint DIR` (or `catsgen calibrate`)"


def default_thresholds_path(checkpoint_dir) -> Path:
    return Path(checkpoint_dir) / THRESHOLDS_FILENAME


def check_sparsity(sparsity: float):
    if not 0 <= sparsity <= MAX_SPARSITY:  # also rejects NaN
        raise UserError(f"--sparsity {sparsity} is outside [0, {MAX_SPARSITY}]")


def check_allocation(allocation: str | None):
    if allocation is not None and allocation not in ALLOCATIONS:
        raise UserError(f"--allocation {allocation!r}: choose {', '.join(ALLOCATIONS[:-1])} or {ALLOCATIONS[-1]}")


def resolve_allocation(table: "ThresholdsTable", allocation: str | None) -> str:
    """The requested allocation, checked against the file; None = the best the file has."""
    check_allocation(allocation)
    allocation = allocation or table.default_allocation()
    table.layer_sparsities(0.5, allocation)  # a clear error now if the file lacks it
    return allocation


def model_info(config, checkpoint_dir) -> dict:
    """What a thresholds file records about its model; None fingerprint for random weights."""
    from catsgen.checkpoint import checkpoint_fingerprint
    return {"architecture": config.architecture, "n_layers": config.n_layers,
            "intermediate_size": config.intermediate_size, "hidden_size": config.dim,
            "fingerprint": checkpoint_fingerprint(checkpoint_dir) if checkpoint_dir is not None else None}


@dataclass
class ThresholdsTable:
    """Per layer, the threshold for every level 0.00..0.99, and the model and text that made them."""
    model: dict
    calibration: dict
    per_layer: list[list[float]]  # [layer][level]
    path: Path | None = None

    allocations: dict | None = None  # allocation name -> {"sparsity": [level][layer], how it was found}

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
        vectors = []
        for layer, row in enumerate(self.per_layer):
            ends = {j: self._grid_vector(entry, row, j, layer) for j in (k, k + 1)}  # only the two used
            vectors.append(interpolate_between(points, ends, sparsity))
        return vectors

    def _grid_vector(self, entry: dict, row: list[float], j: int, layer: int) -> torch.Tensor:
        import torch  # here only: the CLI checks its settings with this module before torch loads
        n = self.model["intermediate_size"]
        if j == 0:
            return torch.zeros(n)
        if j > len(entry["grid"]):
            return torch.full((n,), row[-1])
        return torch.tensor(entry["neuron_thresholds"][j - 1][layer])

    def threshold_vectors(self, sparsity: float, allocation: str) -> list[float] | list[torch.Tensor]:
        """What each layer's CATS holds at this sparsity: one threshold, or an [F] vector per neuron."""
        if self.has_neuron_thresholds(allocation):
            return self.neuron_thresholds(sparsity, allocation)
        return self.for_sparsity(sparsity, allocation)

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
        model = " (int8 model)" if c.get("quantize") == "int8" else ""  # files before --quantize: float
        return f"calibrated{model} on {c.get('tokens')} tokens of {texts} on {c.get('date', '?')[:10]}"

    def to_json(self) -> dict:
        data = {"format": FILE_FORMAT, "version": FILE_VERSION, "model": self.model,
                "calibration": self.calibration, "levels": LEVELS, "thresholds": self.per_layer}
        if self.allocations:
            data["allocations"] = self.allocations
        return data

    def save(self, path: Path):
        write_json_atomically(path, self.to_json(), option="thresholds file")

    @classmethod
    def load(cls, path: Path) -> "ThresholdsTable":
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
        _check_file(path, data)
        return table


class _Damaged(Exception):
    """One wrong entry of a thresholds file: its place (e.g. thresholds[3][17]) and what is wrong."""


def _check_file(path, data: dict):
    """Shapes and values of a thresholds file, checked once at load: NaN, a string or a sparsity
    of 5.0 would otherwise give garbage text (measured sparsity 1.000) or crash much later."""
    try:
        model = data.get("model")
        if not isinstance(model, dict):
            raise _Damaged("model: expected a JSON object")
        n_layers = _count(model.get("n_layers"), "model.n_layers")
        n_neurons = _count(model.get("intermediate_size"), "model.intermediate_size")
        if data.get("levels") != LEVELS:
            raise _Damaged(f"levels: expected the {len(LEVELS)} levels 0.00, 0.01, ..., {MAX_SPARSITY}")
        _check_table(data.get("thresholds"), "thresholds", n_layers, len(LEVELS), _THRESHOLD, ascending=True)
        allocations = data.get("allocations", {})
        if not isinstance(allocations, dict):
            raise _Damaged("allocations: expected a JSON object")
        for name, entry in allocations.items():
            where = f"allocations.{name}"
            if name not in ALLOCATIONS[1:] or not isinstance(entry, dict):
                raise _Damaged(f"{where}: expected greedy or fisher, each a JSON object")
            _check_table(entry.get("sparsity"), f"{where}.sparsity", len(LEVELS), n_layers, _SPARSITY)
            if "neuron_thresholds" in entry or name == "fisher":
                _check_neuron_tables(entry, where, n_layers, n_neurons)
    except _Damaged as e:
        raise UserError(f"{path} is damaged: {e}: {CALIBRATE_HINT}") from None


_THRESHOLD = ("a finite number >= 0", lambda x: math.isfinite(x) and x >= 0)
_SPARSITY = (f"a sparsity in [0, {MAX_SPARSITY}]", lambda x: 0 <= x <= MAX_SPARSITY)
_GRID = (f"a sparsity in (0, {MAX_SPARSITY})", lambda x: 0 < x < MAX_SPARSITY)


def _count(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Damaged(f"{where} is {json.dumps(value)}, expected a positive integer")
    return value


def _check_row(row, where: str, length: int, kind: tuple, ascending: bool = False):
    if not isinstance(row, list) or len(row) != length:
        got = f"{len(row)} entries" if isinstance(row, list) else json.dumps(row)[:40]
        raise _Damaged(f"{where} is {got}, expected a list of {length}")
    what, ok = kind
    for i, x in enumerate(row):  # bool is an int in Python, not a number in the file
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not ok(x):
            raise _Damaged(f"{where}[{i}] is {json.dumps(x)[:40]}, expected {what}")
        if ascending and i > 0 and x < row[i - 1]:
            raise _Damaged(f"{where}[{i}] is {x}, below {where}[{i - 1}] ({row[i - 1]}): thresholds "
                           "must not decrease as the sparsity rises")


def _check_table(rows, where: str, n_rows: int, n_columns: int, kind: tuple, ascending: bool = False):
    if not isinstance(rows, list) or len(rows) != n_rows:
        got = f"{len(rows)} rows" if isinstance(rows, list) else json.dumps(rows)[:40]
        raise _Damaged(f"{where} is {got}, expected {n_rows} rows of {n_columns}")
    for i, row in enumerate(rows):
        _check_row(row, f"{where}[{i}]", n_columns, kind, ascending)


def _check_neuron_tables(entry: dict, where: str, n_layers: int, n_neurons: int):
    grid, tables = entry.get("grid"), entry.get("neuron_thresholds")
    if not isinstance(grid, list) or not grid:
        raise _Damaged(f"{where}.grid is {json.dumps(grid)[:40]}, expected a non-empty list")
    _check_row(grid, f"{where}.grid", len(grid), _GRID)
    if any(b <= a for a, b in zip(grid, grid[1:])):
        raise _Damaged(f"{where}.grid {grid} is not strictly ascending")
    if not isinstance(tables, list) or len(tables) != len(grid):
        raise _Damaged(f"{where}.neuron_thresholds: expected one table per grid point ({len(grid)})")
    for j, table in enumerate(tables):
        _check_table(table, f"{where}.neuron_thresholds[{j}]", n_layers, n_neurons, _THRESHOLD)


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


def load_thresholds(model, checkpoint_dir, thresholds_path=None, sparsity: float | None = None) -> ThresholdsTable:
    """The thresholds file for this checkpoint (default: next to it), checked against the model."""
    if thresholds_path is not None and Path(thresholds_path).is_dir():
        raise UserError(f"--thresholds {thresholds_path} is a directory, not a thresholds file")
    if thresholds_path is not None and not Path(thresholds_path).is_file():
        raise UserError(f"thresholds file {thresholds_path} does not exist: {CALIBRATE_HINT}")
    path = Path(thresholds_path) if thresholds_path is not None else default_thresholds_path(checkpoint_dir)
    if not path.is_file():
        needs = f"--sparsity {sparsity}" if sparsity is not None else "CATS"
        raise UserError(f"{needs} needs a thresholds file and there is none at {path}: "
                        f"{CALIBRATE_HINT.replace('DIR', str(checkpoint_dir))}, or pass --thresholds PATH")
    table = ThresholdsTable.load(path)
    table.check_model(model_info(model.config, checkpoint_dir))
    return table
