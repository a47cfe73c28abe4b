"""Per-layer sparsity allocation: the greedy walk keeps the byte-weighted mean on target, the file
carries it, s = 0 stays dense under every allocation, and --allocation errors are one line."""

import json

import pytest
import torch

from catsgen import allocations, cats
from catsgen.checkpoint import load_model
from catsgen.errors import UserError
from catsgen.thresholds import ALLOCATIONS, LEVELS, MAX_SPARSITY, ThresholdsTable, resolve_allocation
from helpers_cats import run_main


def synthetic_curves(n_layers=7, seed=0):
    """Convex, increasing KL curves of different steepness, as measured on the grid."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n_layers, generator=g) * 10 + 0.1
    power = torch.rand(n_layers, generator=g) * 2 + 1
    return [[float(a * s ** p) for s in allocations.GRID] for a, p in zip(scale, power)]


@pytest.mark.parametrize("weights", [[1] * 7, [3, 1, 2, 5, 1, 1, 4]])
def test_greedy_allocation_hits_every_level_and_is_nested(weights):
    per_level = allocations.greedy_allocation(synthetic_curves(), weights)
    assert len(per_level) == len(LEVELS) and per_level[0] == [0.0] * 7
    for level, sparsities in zip(LEVELS, per_level):
        assert abs(allocations.weighted_mean(sparsities, weights) - level) <= 0.005
        assert all(0 <= s <= MAX_SPARSITY for s in sparsities)
    for lower, higher in zip(per_level, per_level[1:]):  # one walk: a layer's sparsity never falls
        assert all(a <= b for a, b in zip(lower, higher))
    assert per_level[-1] == [MAX_SPARSITY] * 7


def test_greedy_allocation_spares_the_sensitive_layer():
    curves = [[10 * s for s in allocations.GRID], [s for s in allocations.GRID]]
    assert allocations.greedy_allocation(curves, [1, 1])[40] == [0.0, 0.8]


def test_file_carries_the_allocation(calibrated):
    directory, path, _, table = calibrated
    loaded = ThresholdsTable.load(path)
    assert loaded.allocations == table.allocations and loaded.default_allocation() == "fisher"
    weights = allocations.layer_bytes(load_model(directory))
    for s in (0.3, 0.5, 0.555, 0.7, 0.99):  # between levels too: interpolation keeps the mean
        assert abs(allocations.weighted_mean(loaded.layer_sparsities(s, "greedy"), weights) - s) <= 0.005
    entry = loaded.allocations["greedy"]
    assert entry["tokens"] == 64 and len(entry["kl"]) == 2 and "greedy" in entry["method"]


def test_old_file_works_uniform_and_refuses_greedy(calibrated):
    _, path, old, _ = calibrated
    table = ThresholdsTable.load(old)
    assert table.allocations is None and resolve_allocation(table, None) == "uniform"
    assert table.for_sparsity(0.5) == ThresholdsTable.load(path).for_sparsity(0.5, "uniform")
    with pytest.raises(UserError, match="no 'greedy' allocation"):
        resolve_allocation(table, "greedy")


def test_damaged_allocation_is_refused(calibrated, tmp_path):
    _, path, _, _ = calibrated
    data = json.loads(path.read_text())
    data["allocations"]["greedy"]["sparsity"] = data["allocations"]["greedy"]["sparsity"][:5]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match="damaged"):
        ThresholdsTable.load(bad)


def test_sparsity_zero_is_dense_under_every_allocation(calibrated):
    directory, _, _, table = calibrated
    model = load_model(directory)
    idx = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(idx)
        for name in ALLOCATIONS:
            cats.set_sparsity(model, table, 0.5, name)
            assert not torch.equal(model(idx), dense)
            cats.set_sparsity(model, table, 0.0, name)
            assert torch.equal(model(idx), dense)


def test_greedy_changes_the_layers_not_the_mean(calibrated):
    directory, _, _, table = calibrated
    s = next(s for s in LEVELS if table.layer_sparsities(s, "greedy") != [s, s])
    assert sum(table.layer_sparsities(s, "greedy")) / 2 == pytest.approx(s, abs=0.005)
    model = load_model(directory)
    cats.set_sparsity(model, table, s, "greedy")
    assert [float(m.activation.threshold) for m in model.mlps] == pytest.approx(table.for_sparsity(s, "greedy"))
    assert table.for_sparsity(s, "greedy") != table.for_sparsity(s, "uniform")


@pytest.mark.parametrize("command", [
    ("perplexity", "--sparsity", 0.5),
    ("generate", "--prompt", "hi", "--max-new-tokens", 2, "--device", "cpu", "--sparsity", 0.5),
    ("bench", "--sparsity", 0.5, "--new-tokens", 3, "--repeats", 1, "--device", "cpu"),
])
def test_bad_allocation_is_a_one_line_error(calibrated, capsys, command):
    directory, _, old, _ = calibrated
    for value, message in (("best", "--allocation 'best': choose uniform, greedy or fisher"),
                           ("greedy", "no 'greedy' allocation")):
        code, _, err = run_main(capsys, *command, "--checkpoint", directory, "--thresholds", old,
                                "--allocation", value)
        errors = [line for line in err.splitlines() if line.startswith("error:")]  # after progress notes
        assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_perplexity_rows_per_allocation(calibrated, capsys):
    directory, path, _, _ = calibrated
    code, out, err = run_main(capsys, "perplexity", "--checkpoint", directory, "--thresholds", path,
                              "--sparsity", 0.5, "--allocation", "uniform", "greedy",
                              "--max-tokens", 200, "--seq-len", 100, "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["allocation"], r["sparsity"]) for r in rows] == [("dense", 0.0), ("uniform", 0.5), ("greedy", 0.5)]
