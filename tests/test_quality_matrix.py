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


def words(text):
    return len(text.split())


def lines(tag, n, words_per_line):
    return "".join(" ".join(f"{tag}{i}w{j}" for j in range(words_per_line)) + "\n" for i in range(n))


def test_mix_is_deterministic_and_every_prefix_is_balanced():
    # lines of different lengths per text: balance comes from the token counts, not the line counts
    texts = [lines("a", 400, 3), lines("b", 400, 7), lines("c", 400, 11)]
    chunks = qm.mix_chunks(texts, words, 40, 1800)
    assert chunks == qm.mix_chunks(texts, words, 40, 1800)
    assert [i for i, _ in chunks[:6]] == [0, 1, 2, 0, 1, 2]  # round-robin
    assert sum(words(c) for _, c in chunks) >= 1800
    for prefix in (240, 1800):
        shares = qm.prefix_shares(chunks, words, 3, prefix)
        assert max(abs(s - 1 / 3) for s in shares) < 0.05, (prefix, shares)
    # each text's lines appear in order, none lost or repeated
    for i, tag in enumerate("abc"):
        mine = "".join(c for j, c in chunks if j == i).split()
        assert mine == texts[i].split()[:len(mine)]


def test_mix_stops_when_a_text_runs_out():
    chunks = qm.mix_chunks([lines("a", 5, 4), lines("b", 500, 4)], words, 8, 10_000)
    assert "".join(c for i, c in chunks if i == 0).split() == lines("a", 5, 4).split()
    assert sum(words(c) for i, c in chunks if i == 1) <= 5 * 4 + 8


def test_a_mix_is_in_sample_for_its_parts_only():
    assert qm.parts("mix_no_devil") == ("pydoc", "webster", "policy")
    assert qm.in_sample("mix_no_devil", "pydoc") and not qm.in_sample("mix_no_devil", "devil")
    assert qm.in_sample("devil", "devil") and not qm.in_sample("devil", "pydoc")
    assert qm.parts("mix_pydoc_devil") == ("pydoc", "devil") and not qm.in_sample("mix_pydoc_devil", "policy")


def test_comparison_takes_the_single_text_cells_of_the_held_out_text():
    mix = cell("mix_no_b", "b", 20.0, 12.0)  # removes 80%
    mix["reference"] = {"calibration": "a", "levels": {"0.5": {"uniform": {"perplexity": 19.0, "actual": 0.5},
                                                                 "fisher": {"perplexity": 14.5, "actual": 0.5}}}}
    other = {"cells": [cell("a", "b", 20.0, 15.0), cell("c", "b", 20.0, 18.0), cell("b", "b", 20.0, 10.0),
                       cell("a", "c", 20.0, 11.0)]}
    (row,) = qm.comparison({"cells": [mix, cell("a", "b", 20.0, 15.0)]}, other)
    assert row["removed"] == pytest.approx(80) and row["reference"]["removed"] == pytest.approx(50)
    assert row["single"] == pytest.approx({"a": 50, "c": 20})  # b -> b is in-sample, a -> c another text
