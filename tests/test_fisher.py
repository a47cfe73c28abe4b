"""Fisher-weighted per-neuron thresholds: the Lagrangian spends sparsity where the cost is lowest,
hits each level, the file carries per-neuron tables (old files still load), s = 0 stays dense."""

import json

import pytest
import torch

from catsgen import allocations, cats
from catsgen.checkpoint import load_model
from catsgen.errors import UserError
from catsgen.thresholds import LEVELS, ThresholdsTable, resolve_allocation
from helpers_cats import calibrate_quietly


def curves_from(absv, cost):
    return [allocations._curve(a, c) for a, c in zip(absv, cost)]


def random_layers(n_layers=3, tokens=1000, neurons=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    absv = [torch.rand(tokens, neurons, generator=g) for _ in range(n_layers)]
    scale = [torch.rand(neurons, generator=g) * 10 ** l for l in range(n_layers)]  # layers differ in cost
    return absv, [(a * s) ** 2 for a, s in zip(absv, scale)]


@pytest.mark.parametrize("level", [0.1, 0.3, 0.5, 0.9])
def test_fisher_level_zeroes_the_level_on_calibration_values(level):
    absv, cost = random_layers()
    thresholds, per_layer = allocations.fisher_level(curves_from(absv, cost), level)
    zeroed = [float((a <= t).double().mean()) for a, t in zip(absv, thresholds)]
    assert sum(zeroed) / len(zeroed) == pytest.approx(level, abs=0.01)
    assert zeroed == pytest.approx(per_layer, abs=0.01)
    assert per_layer[0] > level > per_layer[-1]  # the cheap layer gives more, the costly one less


def test_fisher_level_spares_the_costly_neuron():
    absv = [torch.rand(1000, 2, generator=torch.Generator().manual_seed(1))]
    cost = [absv[0] ** 2 * torch.tensor([1.0, 1000.0])]
    thresholds, _ = allocations.fisher_level(curves_from(absv, cost), 0.5)
    zeroed = (absv[0] <= thresholds[0]).double().mean(0)
    assert zeroed[0] > 0.9 and zeroed[1] < 0.1


def test_fisher_allocation_means_hit_every_level():
    absv, cost = random_layers()
    weights = [1, 1, 1]
    entry = allocations.fisher_allocation(curves_from(absv, cost), weights)
    assert entry["grid"] == list(allocations.FISHER_GRID) and len(entry["sparsity"]) == len(LEVELS)
    for level, sparsities in zip(LEVELS, entry["sparsity"]):
        assert allocations.weighted_mean(sparsities, weights) == pytest.approx(level, abs=0.005)
    assert entry["sparsity"][0] == [0.0] * 3


def test_file_carries_neuron_thresholds(calibrated):
    directory, path, _, table = calibrated
    loaded = ThresholdsTable.load(path)
    entry = loaded.allocations["fisher"]
    assert loaded.default_allocation() == "fisher" and entry["tokens"] == 256
    n_layers, n = table.model["n_layers"], table.model["intermediate_size"]
    at_grid = loaded.neuron_thresholds(0.5, "fisher")
    assert len(at_grid) == n_layers and all(t.shape == (n,) for t in at_grid)
    assert torch.allclose(torch.stack(at_grid), torch.tensor(entry["neuron_thresholds"][4]))
    assert all(not t.any() for t in loaded.neuron_thresholds(0.0, "fisher"))
    between = loaded.neuron_thresholds(0.55, "fisher")  # halfway between the 0.5 and 0.6 tables
    above = loaded.neuron_thresholds(0.6, "fisher")
    assert all(torch.allclose(m, (a + b) / 2) for m, a, b in zip(between, at_grid, above))


def test_fisher_installs_vectors_and_zero_stays_dense(calibrated):
    directory, _, _, table = calibrated
    model = load_model(directory)
    idx = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(idx)
        cats.set_sparsity(model, table, 0.5, "fisher")
        assert all(m.activation.threshold.shape == (table.model["intermediate_size"],) for m in model.mlps)
        sparse = model(idx)
        assert not torch.equal(sparse, dense)
        cats.set_sparsity(model, table, 0.5, "uniform")  # back to one threshold per layer
        assert not torch.equal(model(idx), sparse)
        cats.set_sparsity(model, table, 0.0, "fisher")
        assert torch.equal(model(idx), dense)


def test_fisher_sparsity_is_on_target_on_calibration_text(calibrated):
    directory, _, _, table = calibrated
    from catsgen.text_sample import text_sources, token_stream, windows
    from catsgen.tokenizer import Tokenizer
    model = load_model(directory)
    head = list(windows(token_stream(text_sources(None), Tokenizer(directory)), 128, 256))
    cats.set_sparsity(model, table, 0.5, "fisher")
    counter = cats.SparsityCounter(model.config.n_layers, 0.5)
    for w in head:
        cats.measure_sparsity(model, torch.tensor([w]), counter)
    assert counter.overall() == pytest.approx(0.5, abs=0.03)  # all layers sparse: some drift


def test_damaged_neuron_table_is_refused(calibrated, tmp_path):
    _, path, _, _ = calibrated
    data = json.loads(path.read_text())
    data["allocations"]["fisher"]["neuron_thresholds"][2] = data["allocations"]["fisher"]["neuron_thresholds"][2][:1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(UserError, match="damaged"):
        ThresholdsTable.load(bad)


def test_file_without_fisher_defaults_to_greedy_and_refuses_fisher(calibrated, tmp_path):
    _, path, _, _ = calibrated
    data = json.loads(path.read_text())
    del data["allocations"]["fisher"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    table = ThresholdsTable.load(old)
    assert resolve_allocation(table, None) == "greedy"
    with pytest.raises(UserError, match="no 'fisher' allocation"):
        resolve_allocation(table, "fisher")


def test_fisher_without_greedy(checkpoints, tmp_path):
    """--allocation-tokens 0 turns the greedy search off, not the fisher thresholds."""
    table = calibrate_quietly(checkpoints["gqa"][0], tmp_path / "t.json", tokens=256, seq_len=128,
                              allocation_tokens=0, fisher_tokens=128)
    loaded = ThresholdsTable.load(tmp_path / "t.json")
    assert set(loaded.allocations) == {"fisher"} and loaded.default_allocation() == "fisher"
    assert table.has_neuron_thresholds("fisher")
