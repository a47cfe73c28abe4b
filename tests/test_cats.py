"""CATS on small random models: the activation, the calibration quantiles, the thresholds file,
apply_sparsity / measured sparsity, and the calibrate / perplexity / generate CLI errors."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from catsgen import cats
from catsgen.calibrate import ActivationSample
from catsgen.checkpoint import checkpoint_fingerprint, load_model
from catsgen.generate import apply_sparsity
from catsgen.model import DenseSiLU
from catsgen.thresholds import FILE_FORMAT, LEVELS, THRESHOLDS_FILENAME, ThresholdsTable, model_info
from conftest import assert_one_line_error
from catsgen.parallel import ShardPlan
from helpers_cats import calibrate_quietly, run_main

D, FF = 48, 80


def mlp_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(FF, D, generator=g) / D ** 0.5 for _ in range(3)]


# --- the activation -------------------------------------------------------------------------------

def test_cats_mlp_equals_independently_masked_dense_mlp():
    w_gate, w_up, w_down_t = mlp_weights()
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    t = 0.2
    # Independent float64 computation: gate, SiLU as g * sigmoid(g), zero where |v| <= t.
    xd = x.double()
    g = xd @ w_gate.double().T
    v = g * torch.sigmoid(g)
    v[v.abs() <= t] = 0
    expected = (v * (xd @ w_up.double().T)) @ w_down_t.double()
    assert 0.2 < (v == 0).double().mean() < 0.8  # the threshold really masks something
    got = cats.CATS(0, t)(x, w_gate, w_up, w_down_t)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, per_neuron", [((1, 1, D), False), ((2, 3, D), False), ((1, 1, D), True)])
def test_cpu_decode_path_skipping_rows_equals_the_reference(shape, per_neuron):
    """Few tokens on the CPU: W_down rows of inactive neurons are skipped (embedding_bag over the
    active ones, a union over the tokens); the result is the masked dense MLP's."""
    w_gate, w_up, w_down_t = mlp_weights()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0.1, 0.8, FF) if per_neuron else torch.tensor(0.45)
    act = cats.CATS(0, t)
    v = F.silu(x @ w_gate.T)
    assert 0.1 < (act.keep(v).flatten(0, 1).any(0) == 0).double().mean() < 0.9  # rows really skipped
    reference = (torch.where(v.abs() > t, v, 0) * (x @ w_up.T)) @ w_down_t
    torch.testing.assert_close(act(x, w_gate, w_up, w_down_t), reference, rtol=1e-5, atol=1e-6)
    nothing = cats.CATS(0, float("inf"))(x, w_gate, w_up, w_down_t)  # every row skipped
    assert nothing.shape == x.shape and not nothing.any()


def test_never_masking_threshold_is_bit_identical_to_dense():
    w_gate, w_up, w_down_t = mlp_weights()
    x = torch.randn(1, 7, D)
    dense = DenseSiLU()(x, w_gate, w_up, w_down_t)
    assert torch.equal(cats.CATS(0, float("-inf"))(x, w_gate, w_up, w_down_t), dense)


def test_threshold_update_is_in_place():
    """A new sparsity writes into the same buffer: a compiled step sees it without recompiling."""
    act = cats.CATS(0, 0.1)
    buffer = act.threshold
    assert buffer.dtype == torch.float32 and buffer.dim() == 0
    model = type("M", (), {"mlps": [type("MLP", (), {"activation": act, "w_up": torch.zeros(4, 3)})()], "plan": ShardPlan(0, 1, 1, 1, 1, 1),
                           "output": type("O", (), {"weight": torch.zeros(1)})()})()
    cats.set_thresholds(model, [0.25])
    assert model.mlps[0].activation is act and act.threshold is buffer and float(buffer) == 0.25


# --- calibration quantiles ------------------------------------------------------------------------

def silu_magnitudes(n, seed):
    """|SiLU(g)| for Gaussian g: the real shape, with its pile-up at |SiLU| minimum 0.2785."""
    # Seeds apart from the sampler's own (0): the same stream would correlate data and sampling.
    g = torch.randn(n, generator=torch.Generator().manual_seed(1000 + seed)) * 2
    return F.silu(g)


def test_sample_thresholds_are_exact_quantiles_when_everything_fits():
    chunks = [silu_magnitudes(30_000, seed) for seed in range(4)]
    chunks[0][:300] = 0  # exact zeros count as below any threshold
    values = torch.cat(chunks).abs()
    sample = ActivationSample(n_layers=1, expected_per_layer=values.numel())
    assert sample.rate == 1
    for c in chunks:  # accumulated over several adds, as over windows
        sample.add(0, c)
    thresholds = sample.thresholds()[0]
    assert thresholds[0] == 0 and thresholds == sorted(thresholds)
    for i, level in enumerate(LEVELS):
        # Ties: the exact zeros fall below every threshold, and fp32 has a few repeated values.
        expected = max(round(level * values.numel()), 300)
        assert abs((values <= thresholds[i]).sum().item() - expected) <= 5, level


def test_subsampled_thresholds_stay_within_binomial_error(monkeypatch):
    monkeypatch.setattr(ActivationSample, "SIZE", 20_000)
    chunks = [silu_magnitudes(50_000, seed) for seed in range(4)]
    values = torch.cat(chunks).abs()
    sample = ActivationSample(n_layers=1, expected_per_layer=values.numel())
    for c in chunks:
        sample.add(0, c)
    kept = sum(p.numel() for p in sample.parts[0])
    assert abs(kept - 20_000) < 4 * 20_000 ** 0.5  # memory follows SIZE, not the token count
    thresholds = sample.thresholds()[0]
    for level in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
        fraction = (values <= thresholds[round(level * 100)]).double().mean().item()
        assert abs(fraction - level) < 4 * (level * (1 - level) / kept) ** 0.5 + 1e-4, level


def test_for_sparsity_interpolates_between_levels():
    row = [float(i) for i in range(100)]
    table = ThresholdsTable({}, {}, [row])
    assert table.for_sparsity(0.3) == [30.0]
    assert table.for_sparsity(0.29) == [pytest.approx(29.0)]
    assert table.for_sparsity(0.305) == [pytest.approx(30.5)]
    assert table.for_sparsity(0.99) == [99.0]


# --- thresholds file and apply_sparsity on a tiny checkpoint --------------------------------------

@pytest.fixture(scope="module")
def tiny(calibrated):
    """(checkpoint dir, thresholds path): a random Llama calibrated on the built-in text, no allocations."""
    directory, _, old, _ = calibrated
    return directory, old


def test_thresholds_file_round_trips(tiny):
    directory, path = tiny
    data = json.loads(path.read_text())
    assert data["format"] == FILE_FORMAT and data["levels"][:3] == [0.0, 0.01, 0.02]
    assert data["model"] == model_info(load_model(directory).config, directory)
    assert data["calibration"]["tokens"] == 512 and data["calibration"]["seq_len"] == 128
    assert data["calibration"]["texts"][0]["name"].startswith("pydoc_data.topics")
    assert data["calibration"]["engine_version"] and data["calibration"]["date"]
    table = ThresholdsTable.load(path)
    assert table.per_layer == data["thresholds"] and len(table.per_layer) == 2
    for row in table.per_layer:
        assert len(row) == 100 and row == sorted(row) and row[50] > 0
    copy = path.parent / "copy.json"
    table.save(copy)
    assert ThresholdsTable.load(copy).to_json() == table.to_json()


def test_fingerprint_follows_files_not_location_or_load_dtype(checkpoints, tmp_path):
    directory = checkpoints["gqa"][0]
    moved = tmp_path / "moved"
    shutil.copytree(directory, moved)
    assert checkpoint_fingerprint(moved) == checkpoint_fingerprint(directory)
    assert checkpoint_fingerprint(checkpoints["mha"][0]) != checkpoint_fingerprint(directory)
    bf16 = load_model(directory, dtype=torch.bfloat16)
    assert model_info(bf16.config, directory)["fingerprint"] == checkpoint_fingerprint(directory)


def test_sparsity_zero_is_bit_identical_to_dense(tiny):
    directory, path = tiny
    model = load_model(directory)
    idx = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(idx)
        assert apply_sparsity(model, directory, 0.0, path) is None
        assert torch.equal(model(idx), dense)
        counter = apply_sparsity(model, directory, 0.5, path)
        assert counter is not None and not torch.equal(model(idx), dense)
        cats.set_sparsity(model, ThresholdsTable.load(path), 0.0)  # back to dense
        assert torch.equal(model(idx), dense)


def test_measured_sparsity_counts_the_generated_positions(tiny):
    directory, path = tiny
    model = load_model(directory)
    counter = apply_sparsity(model, directory, 0.5, path)
    prompt, new = list(range(10, 30)), list(range(40, 47))
    cats.measure_generation_sparsity(model, prompt, new, counter)
    assert counter.total == [len(new) * model.config.intermediate_size] * model.config.n_layers
    assert 0.2 < counter.overall() < 0.8
    report = cats.report_sparsity(counter)
    assert "target 0.50" in report and f"measured {counter.overall():.3f}" in report
    # measuring swapped counting activations in and put the run's CATS back (the kernel path)
    assert all(type(m.activation) is cats.CATS for m in model.mlps)


def test_measured_sparsity_is_near_target_on_the_calibration_text(checkpoints, tmp_path):
    from catsgen.text_sample import text_sources, token_stream, windows
    from catsgen.tokenizer import Tokenizer
    directory = checkpoints["gqa"][0]
    path = tmp_path / "t.json"
    calibrate_quietly(directory, path, tokens=1024, seq_len=256)
    model, table = load_model(directory), ThresholdsTable.load(path)
    token_windows = list(windows(token_stream(text_sources(None), Tokenizer(directory)), 256, 1024))
    for s in (0.3, 0.7):
        cats.set_sparsity(model, table, s)
        counter = cats.SparsityCounter(model.config.n_layers, s)
        with cats.counting(model, counter), torch.no_grad():
            for w in token_windows:
                model(torch.tensor([w]))
        assert abs(counter.overall() - s) < 0.02


def test_union_sparsity_of_identical_sequences_equals_single(tiny):
    directory, path = tiny
    model = load_model(directory)
    cats.set_sparsity(model, ThresholdsTable.load(path), 0.5)
    prompt = list(range(5, 25))
    assert cats.measure_union_sparsity(model, prompt, 3) == pytest.approx(cats.measure_union_sparsity(model, prompt, 1))


# --- CLI errors: one line on stderr, exit code 2 --------------------------------------------------

GEN = ("generate", "--prompt", "The quick brown fox", "--max-new-tokens", 3, "--device", "cpu")


def test_generate_sparsity_without_thresholds_file(checkpoints, capsys):
    directory = checkpoints["gqa"][0]
    code, _, err = run_main(capsys, *GEN, "--checkpoint", directory, "--sparsity", 0.5)
    assert_one_line_error(code, err, "needs a thresholds file", "cats_thresholds.json", "calibrate")


def test_generate_with_a_missing_thresholds_path(checkpoints, capsys, tmp_path):
    code, _, err = run_main(capsys, *GEN, "--checkpoint", checkpoints["gqa"][0], "--sparsity", 0.5,
                            "--thresholds", tmp_path / "nope.json")
    assert_one_line_error(code, err, "does not exist", "calibrate")


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 0.995, float("nan")])
def test_generate_sparsity_out_of_range(checkpoints, capsys, sparsity):
    code, _, err = run_main(capsys, *GEN, "--checkpoint", checkpoints["gqa"][0], "--sparsity", sparsity)
    assert_one_line_error(code, err, "outside [0, 0.99]")


def test_thresholds_for_other_weights(checkpoints, tiny, capsys):
    """Same shapes, different weights: caught by the fingerprint."""
    _, path = tiny
    code, _, err = run_main(capsys, *GEN, "--checkpoint", checkpoints["mha"][0], "--sparsity", 0.5,
                            "--thresholds", path)
    assert_one_line_error(code, err, "calibrated for other weights", "fingerprint")


def test_thresholds_for_another_model_shape(tiny, capsys, tmp_path):
    directory, path = tiny
    data = json.loads(path.read_text())
    data["model"]["n_layers"] = 30
    data["thresholds"] = data["thresholds"] * 15
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    code, _, err = run_main(capsys, *GEN, "--checkpoint", directory, "--sparsity", 0.5, "--thresholds", other)
    assert_one_line_error(code, err, "calibrated for another model", "n_layers 30 there, 2 here")


def test_not_a_thresholds_file(tiny, capsys, tmp_path):
    directory, _ = tiny
    bad = tmp_path / "bad.json"
    bad.write_text("{\"hello\": 1}")
    code, _, err = run_main(capsys, *GEN, "--checkpoint", directory, "--sparsity", 0.5, "--thresholds", bad)
    assert_one_line_error(code, err, "not a catsgen thresholds file")


def test_generate_reports_measured_sparsity(tiny, capsys):
    directory, path = tiny
    code, out, err = run_main(capsys, *GEN, "--checkpoint", directory, "--sparsity", 0.5, "--thresholds", path)
    assert code == 0, err
    assert "CATS sparsity: target 0.50, measured" in err and "layers   0-1" in err


def test_perplexity_sparsity_without_thresholds_file(checkpoints, capsys):
    code, out, err = run_main(capsys, "perplexity", "--checkpoint", checkpoints["gqa"][0],
                              "--sparsity", 0, 0.5, "--max-tokens", 64)
    assert_one_line_error(code, err, "needs a thresholds file", "calibrate")
    assert out == ""


def test_perplexity_sparsity_out_of_range(checkpoints, capsys):
    code, _, err = run_main(capsys, "perplexity", "--checkpoint", checkpoints["gqa"][0], "--sparsity", 0.5, 1.2)
    assert_one_line_error(code, err, "outside [0, 0.99]")


def test_calibrate_missing_text_and_bad_out(checkpoints, capsys, tmp_path):
    directory = checkpoints["gqa"][0]
    code, _, err = run_main(capsys, "calibrate", "--checkpoint", directory, "--text", tmp_path / "none.txt",
                            "--out", tmp_path / "t.json")
    assert_one_line_error(code, err, "none.txt: no such file")
    code, _, err = run_main(capsys, "calibrate", "--checkpoint", directory, "--out", tmp_path / "no" / "t.json")
    assert_one_line_error(code, err, "does not exist or is not writable")


def test_calibrate_unwritable_checkpoint_dir_asks_for_out(checkpoints, capsys, monkeypatch):
    import os
    directory, access = checkpoints["gqa"][0], os.access
    # Root may write anywhere, so the check is made to fail for this directory alone.
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and not (mode == os.W_OK and str(p) == str(directory)))
    code, _, err = run_main(capsys, "calibrate", "--checkpoint", directory)
    assert_one_line_error(code, err, "not writable", "--out")


# --- calibrate and perplexity commands ------------------------------------------------------------

def test_calibrate_cli_short_text_and_default_output(checkpoints, capsys, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints["gqa"][0], directory)
    text = tmp_path / "short.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 5)
    code, _, err = run_main(capsys, "calibrate", "--checkpoint", directory, "--text", text,
                            "--text", text, "--tokens", 100000, "--seq-len", 64)
    assert code == 0, err
    assert "the text ran out after" in err and "fewer than --tokens 100000" in err
    summary = next(line for line in err.splitlines() if line.startswith("calibration took"))
    assert all(f"{phase} " in summary for phase in ("load", "tokenize", "statistics", "thresholds", "write"))
    data = json.loads((directory / THRESHOLDS_FILENAME).read_text())
    assert data["calibration"]["texts"] == [{"name": "short.txt", "bytes": text.stat().st_size}] * 2
    assert data["calibration"]["tokens"] < 1000


def test_calibrate_without_text_says_it_uses_the_builtin_sample(checkpoints, capsys, tmp_path):
    code, _, err = run_main(capsys, "calibrate", "--checkpoint", checkpoints["gqa"][0], "--tokens", 200,
                            "--out", tmp_path / "t.json")
    assert code == 0, err
    assert "no --text given" in err and "pydoc_data.topics" in err


@pytest.mark.parametrize("where", ["loop", "write"])
def test_interrupted_calibration_leaves_no_file(checkpoints, monkeypatch, tmp_path, where):
    import catsgen.calibrate
    import catsgen.progress
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if where == "loop":
        def update(self, done):
            if done > 128:
                raise KeyboardInterrupt
        monkeypatch.setattr(catsgen.progress.Progress, "update", update)
    else:
        def dump(*args, **kwargs):
            args[1].write("{\"partial\": ")
            raise KeyboardInterrupt
        monkeypatch.setattr(json, "dump", dump)
    with pytest.raises(KeyboardInterrupt):
        calibrate_quietly(checkpoints["gqa"][0], out_dir / "t.json", tokens=512, seq_len=128)
    assert list(out_dir.iterdir()) == []


def test_perplexity_json_has_one_row_per_sparsity(tiny, capsys):
    directory, path = tiny
    code, out, err = run_main(capsys, "perplexity", "--checkpoint", directory, "--thresholds", path,
                              "--sparsity", 0.5, 0.3, "--max-tokens", 300, "--seq-len", 128, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [r["sparsity"] for r in report["rows"]] == [0.0, 0.5, 0.3]
    assert report["windows"] == 3 and report["tokens"] == 300
    for row in report["rows"]:
        assert row["tokens"] == 300 - 3 and math.isfinite(row["perplexity"]) and row["perplexity"] > 1
    assert report["rows"][0]["actual_sparsity"] == 0.0
    assert abs(report["rows"][1]["actual_sparsity"] - 0.5) < 0.1
    assert "non-overlapping windows" in report["convention"]


def test_perplexity_table(tiny, capsys):
    directory, path = tiny
    code, out, err = run_main(capsys, "perplexity", "--checkpoint", directory, "--thresholds", path,
                              "--sparsity", 0.5, "--max-tokens", 200, "--seq-len", 100)
    assert code == 0, err
    assert "actual sparsity" in out and "tokens scored" in out and len(out.strip().splitlines()) == 4


def test_perplexity_equals_exp_mean_cross_entropy(tiny):
    """Our windowing against the definition, computed here from the model's raw logits."""
    from catsgen.perplexity import perplexity
    directory, _ = tiny
    model = load_model(directory)
    ids = torch.randint(0, 300, (250,), generator=torch.Generator().manual_seed(3)).tolist()
    token_windows = [ids[:100], ids[100:200], ids[200:]]
    ppl, scored = perplexity(model, token_windows)
    with torch.no_grad():
        losses = [F.cross_entropy(model(torch.tensor([w]))[0, :-1], torch.tensor(w[1:]), reduction="sum")
                  for w in token_windows]
    assert scored == 247
    assert ppl == pytest.approx(math.exp(sum(losses).item() / 247), rel=1e-6)


# --- text windows ---------------------------------------------------------------------------------

def test_windows_and_file_chunks(monkeypatch, tmp_path):
    import catsgen.text_sample as ts
    assert list(ts.windows([[1, 2, 3], [4, 5, 6, 7]], 3, 100)) == [[1, 2, 3], [4, 5, 6], [7]]
    assert list(ts.windows([[1, 2, 3], [4, 5, 6, 7]], 3, 5)) == [[1, 2, 3], [4, 5]]
    assert list(ts.windows(iter([list(range(10))]), 4, 8)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    monkeypatch.setattr(ts, "CHUNK_CHARS", 10)
    text = "alpha beta\ngamma delta epsilon\n" + "x" * 25 + " tail é"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    chunks = list(ts._file_chunks(path))
    assert "".join(chunks) == text and len(chunks) > 3
    path.write_bytes(b"ok\n\xff\xfe bad")
    with pytest.raises(Exception, match="not UTF-8"):
        list(ts._file_chunks(path))


def test_calibration_interleaves_several_texts_in_turns():
    """token_stream with a turn: round-robin turns of that many tokens from each text, whole and in
    order, a text that runs out dropping out; without one, the texts one after the other."""
    from catsgen.text_sample import TextSource, token_stream

    class Chars:  # one token per character
        def encode(self, text, add_special_tokens=False):
            return list(text)

    texts = {"a": "a" * 10, "b": "b" * 4, "c": "c" * 7}
    sources = [TextSource(n, len(t), lambda t=t: iter([t[:3], t[3:]])) for n, t in texts.items()]
    turns = ["".join(ids) for ids in token_stream(sources, Chars(), turn=3)]
    assert turns == ["aaa", "bbb", "ccc", "aaa", "b", "ccc", "aaa", "c", "a"]
    assert "".join(turns).count("a") == 10 and sorted("".join(turns)) == sorted("".join(texts.values()))
    assert "".join("".join(ids) for ids in token_stream(sources, Chars())) == "".join(texts.values())
