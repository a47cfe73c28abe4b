"""scripts/quality_matrix.py without a model: the sparsity matching and the summary's arithmetic."""

import importlib.util
from argparse import Namespace
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("quality_matrix", Path(__file__).parent.parent / "scripts/quality_matrix.py")
qm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qm)


def row(method, requested, actual, ppl=10.0):
    return {"allocation": method, "sparsity": requested, "actual_sparsity": actual, "perplexity": ppl}


def test_match_moves_the_request_until_actual_is_within_tolerance(monkeypatch):
    requests = []

    def fake_score(args, thresholds, ev, allocations, sparsities, name):  # actual = 0.9 x requested
        requests.append(sparsities[0])
        return {"rows": [row("dense", 0.0, 0.0), row(allocations[0], sparsities[0], 0.9 * sparsities[0])]}

    monkeypatch.setattr(qm, "score", fake_score)
    args = Namespace(match=0.005, match_steps=3)
    found = {("fisher", 0.5): row("fisher", 0.5, 0.45)}
    best = qm.match(args, None, "e", "fisher", 0.5, 0.49, found, "b")
    assert abs(best["actual_sparsity"] - 0.49) <= 0.005 and best["sparsity"] > 0.5
    assert len(requests) <= 3


def cell(cal, ev, u, f, fisher_actual=0.503):
    return {"calibration": cal, "evaluation": ev, "dense": 10.0,
            "levels": {"0.5": {"uniform": {"perplexity": u, "actual": 0.5, "requested": 0.5},
                               "fisher": {"perplexity": f, "actual": fisher_actual, "requested": 0.5}}}}


def test_summary_worst_pair_and_share_removed():
    cells = [cell("a", "b", 20.0, 15.0), cell("b", "a", 20.0, 21.0), cell("a", "a", 20.0, 10.0)]
    (s,) = qm.summary(cells, ["fisher"], [0.5], 0.005)
    assert s["mean_removed"] == pytest.approx((50 - 10) / 2)  # the in-sample cell is left out
    assert s["worst_removed"] == pytest.approx(-10) and s["worst_pair"] == ["b", "a"]
    assert s["pairs_worse_than_uniform"] == 1 and s["unmatched_cells"] == 0


def test_markdown_summary_counts_cells_off_uniform_sparsity():
    cells = [cell("a", "b", 20.0, 15.0), cell("b", "a", 20.0, 21.0, fisher_actual=0.51)]
    result = {"allocations": ["uniform", "fisher"], "settings": {"match": 0.005}, "cells": cells,
              "summary": qm.summary(cells, ["fisher"], [0.5], 0.005)}
    first_row = qm.markdown(result).splitlines()[2]
    assert first_row.startswith("| 0.5 | fisher | 20% | -10% (b -> a) | 50% | 1 of 2 |")
    assert first_row.endswith("| 1 |")  # the b -> a cell is 0.01 off uniform's actual sparsity
