"""Bad thresholds files, CLI values and output paths: one-line UserErrors naming the file and the
entry (or the option), found before any work, and nothing partial or temporary left behind, also
after Ctrl-C or SIGTERM.

Most cases call the validators in this process (fast); a handful run the CLI end to end."""

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from catsgen.bench import check_preset_fits, run_bench
from catsgen.checkpoint import random_model
from catsgen.config import ModelConfig, preset
from catsgen.errors import UserError
from catsgen.files import check_output_file, write_json_atomically
from catsgen.generate import run_generation
from catsgen.settings import BenchSettings, CalibrateSettings, GenerateSettings, PerplexitySettings
from catsgen.text_sample import text_sources
from catsgen.thresholds import FILE_FORMAT, FILE_VERSION, LEVELS, ThresholdsTable, load_thresholds
from conftest import ROOT, assert_one_line_error, run_cli

NAN, INF = float("nan"), float("inf")
N_LAYERS, N_NEURONS = 2, 3


# --- thresholds files ----------------------------------------------------------------------------

def valid_thresholds() -> dict:
    """A small well-formed file: 2 layers, 3 neurons, greedy and fisher allocations."""
    row = [round(0.01 * i, 2) for i in range(len(LEVELS))]
    return {"format": FILE_FORMAT, "version": FILE_VERSION, "levels": LEVELS, "calibration": {},
            "model": {"architecture": "llama", "n_layers": N_LAYERS, "intermediate_size": N_NEURONS,
                      "hidden_size": 8, "fingerprint": None},
            "thresholds": [row, list(row)],
            "allocations": {"greedy": {"sparsity": [[s, s] for s in LEVELS]},
                            "fisher": {"sparsity": [[s, s] for s in LEVELS], "grid": [0.3, 0.6],
                                       "neuron_thresholds": [[[0.1] * N_NEURONS] * N_LAYERS] * 2}}}


def damaged(edit):
    data = json.loads(json.dumps(valid_thresholds()))
    edit(data)
    return data


def set_at(keys, value):
    def edit(data):
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return edit


GREEDY, FISHER = ("allocations", "greedy"), ("allocations", "fisher")


@pytest.mark.parametrize("edit, entry", [
    (set_at(("thresholds", 1, 50), NAN), "thresholds[1][50] is NaN"),
    (set_at(("thresholds", 0, 99), INF), "thresholds[0][99] is Infinity"),
    (set_at(("thresholds", 0, 0), -0.5), "thresholds[0][0] is -0.5"),
    (set_at(("thresholds", 0, 10), "0.1"), 'thresholds[0][10] is "0.1"'),
    (set_at(("thresholds", 0, 10), True), "thresholds[0][10] is true"),
    (set_at(("thresholds", 0, 10), None), "thresholds[0][10] is null"),
    (set_at(("thresholds", 0, 10), 0.5), "thresholds[0][11] is 0.11, below thresholds[0][10]"),
    (set_at(("thresholds", 1), [0.0] * 99), "thresholds[1] is 99 entries, expected a list of 100"),
    (set_at(("thresholds",), [[0.0] * 100]), "thresholds is 1 rows, expected 2 rows"),
    (set_at(("thresholds",), {"0": []}), "thresholds is {"),
    (set_at(("model", "n_layers"), "2"), 'model.n_layers is "2"'),
    (set_at(("model", "n_layers"), True), "model.n_layers is true"),
    (set_at(("model",), []), "model: expected a JSON object"),
    (set_at(("levels",), LEVELS[:-1]), "levels: expected the 100 levels"),
    (set_at((*GREEDY, "sparsity", 50, 1), 5.0), "allocations.greedy.sparsity[50][1] is 5.0"),
    (set_at((*GREEDY, "sparsity", 50, 1), -0.1), "allocations.greedy.sparsity[50][1] is -0.1"),
    (set_at((*GREEDY, "sparsity", 50, 0), NAN), "allocations.greedy.sparsity[50][0] is NaN"),
    (set_at((*GREEDY, "sparsity", 50, 0), "half"), 'allocations.greedy.sparsity[50][0] is "half"'),
    (set_at((*GREEDY, "sparsity"), None), "allocations.greedy.sparsity is null"),
    (set_at(GREEDY, [1, 2]), "allocations.greedy: expected greedy or fisher"),
    (set_at(("allocations", "magic"), {}), "allocations.magic: expected greedy or fisher"),
    (set_at(("allocations",), []), "allocations: expected a JSON object"),
    (set_at((*FISHER, "neuron_thresholds", 1, 0, 2), NAN), "allocations.fisher.neuron_thresholds[1][0][2] is NaN"),
    (set_at((*FISHER, "neuron_thresholds", 0, 1, 0), "x"), 'allocations.fisher.neuron_thresholds[0][1][0] is "x"'),
    (set_at((*FISHER, "neuron_thresholds", 0, 1), [0.1] * 4), "allocations.fisher.neuron_thresholds[0][1] is 4 entries"),
    (set_at((*FISHER, "neuron_thresholds"), [[[0.1] * 3] * 2]), "allocations.fisher.neuron_thresholds: expected one table per grid point (2)"),
    (set_at((*FISHER, "grid"), [0.6, 0.3]), "allocations.fisher.grid [0.6, 0.3] is not strictly ascending"),
    (set_at((*FISHER, "grid"), [0.3, 1.5]), "allocations.fisher.grid[1] is 1.5"),
    (set_at((*FISHER, "grid"), []), "allocations.fisher.grid is [], expected a non-empty list"),
])
def test_damaged_thresholds_name_the_entry(tmp_path, edit, entry):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(damaged(edit)))  # json writes NaN / Infinity, and reads them back
    with pytest.raises(UserError) as error:
        ThresholdsTable.load(path)
    message = str(error.value)
    assert message.startswith(f"{path} is damaged: {entry}"), message
    assert "\n" not in message


def test_valid_thresholds_load(tmp_path):
    """The damaged cases above differ from this file by one entry."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps(valid_thresholds()))
    table = ThresholdsTable.load(path)
    assert table.for_sparsity(0.5, "greedy") == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe{}", "is not a readable thresholds file"),
    (b"[]", "is not a catsgen thresholds file"),
    (b"null", "is not a catsgen thresholds file"),
    (b'{"format": "catsgen-cats-thresholds"', "is not a readable thresholds file"),
])
def test_unreadable_thresholds_file(tmp_path, content, fragment):
    path = tmp_path / "t.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=fragment) as error:
        ThresholdsTable.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_directory_as_thresholds_or_text(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        load_thresholds(None, tmp_path, tmp_path)
    with pytest.raises(UserError, match="is a directory"):
        text_sources([tmp_path])


# --- CLI values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (GenerateSettings(temperature=NAN), "--temperature must be a finite number, got nan"),
    (GenerateSettings(temperature=INF), "--temperature must be a finite number, got inf"),
    (GenerateSettings(temperature=-0.5), "--temperature must be >= 0, got -0.5"),
    (GenerateSettings(top_p=0.0), "--top-p must be in (0, 1]"),
    (GenerateSettings(top_p=1.5), "--top-p must be in (0, 1]"),
    (GenerateSettings(top_p=NAN), "--top-p must be in (0, 1], got nan"),
    (GenerateSettings(top_k=0), "--top-k must be >= 1"),
    (GenerateSettings(top_k=-3), "--top-k must be >= 1"),
    (GenerateSettings(seed=2**64), "--seed must be in [0, 2**64 - 1]"),
    (GenerateSettings(seed=-1), "--seed must be in [0, 2**64 - 1]"),
    (GenerateSettings(prompt="caf\udce9"), "--prompt has bytes that are not UTF-8 (at character 3)"),
    (GenerateSettings(sparsity=NAN), "--sparsity nan is outside"),
    (GenerateSettings(sparsity=INF), "--sparsity inf is outside"),
    (GenerateSettings(allocation="best"), "--allocation 'best'"),
    (GenerateSettings(max_seq_len=0), "--max-seq-len must be >= 1"),
    (CalibrateSettings(tokens=0), "--tokens must be >= 1"),
    (PerplexitySettings(sparsities=[0.5, NAN]), "--sparsity nan is outside"),
    (BenchSettings(sparsities=[-0.1]), "--sparsity -0.1 is outside"),
    (BenchSettings(batch_size=0), "--batch-size must be in [1, 8]"),
    (BenchSettings(prompt_len=100, new_tokens=100, max_seq_len=150), "--prompt-len 100 + --new-tokens 100 exceeds"),
])
def test_bad_option_values(settings, message):
    with pytest.raises(UserError) as error:
        settings.validate()
    assert message in str(error.value)


def test_seed_limits_are_accepted():
    GenerateSettings(seed=2**64 - 1, prompt="café").validate()


def test_kv_cache_that_does_not_fit_is_refused(checkpoints):
    """Checked before allocating: a cache of terabytes is one line, not a crash or a swapping machine."""
    model = random_model(ModelConfig.from_checkpoint(checkpoints["gqa"][0]), "cpu")
    with pytest.raises(UserError, match=r"the KV cache for --max-seq-len 10000000000 \(batch 1\) needs .* GiB"):
        model.setup_caches(1, 10**10)
    model.setup_caches(1, 64)  # a small one still fits


def test_preset_that_does_not_fit_is_refused():
    settings = BenchSettings(device="cpu", max_seq_len=10**7, batch_size=8)
    with pytest.raises(UserError, match="--preset llama-2-7b .* needs .* GiB but only"):
        check_preset_fits("llama-2-7b", preset("llama-2-7b"), settings, 2)


def test_preset_has_only_uniform_allocation():
    settings = BenchSettings(device="cpu", dtype="float32", allocation="greedy", compile=False)
    with pytest.raises(UserError, match="--allocation greedy: a --preset .* has only the uniform allocation"):
        run_bench(settings, preset="tiny")


def test_cut_max_new_tokens_is_said(checkpoints, caplog):
    settings = GenerateSettings(prompt="The quick brown fox", max_new_tokens=50, max_seq_len=12,
                                device="cpu", dtype="float32", compile=False)
    with caplog.at_level(logging.WARNING, logger="catsgen"):
        result = run_generation(checkpoints["gqa"][0], settings, out=io.StringIO())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("--max-new-tokens 50 cut to "), warnings
    kept = int(warnings[0].split(" cut to ")[1].split(":")[0])
    assert len(result.tokens[0]) <= kept < 50


# --- output paths --------------------------------------------------------------------------------

@pytest.fixture
def specials(tmp_path):
    """A directory, a FIFO and a device file, none of which may be replaced by an output."""
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    return {"dir": tmp_path / "dir", "fifo": tmp_path / "fifo", "device": "/dev/null"}


@pytest.mark.parametrize("kind, message", [("dir", "is a directory"), ("fifo", "is not a regular file"),
                                           ("device", "is not a regular file")])
def test_output_must_be_a_regular_file(specials, kind, message):
    with pytest.raises(UserError, match=message):
        check_output_file(specials[kind], "--json")


def test_unwritable_output_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist or is not writable"):
        check_output_file(tmp_path / "missing" / "t.json", "--out")


def test_atomic_write_refuses_a_target_that_became_a_fifo(tmp_path):
    """The check at the last moment: the target turned into a FIFO while the run was working."""
    os.mkfifo(tmp_path / "out.json")
    with pytest.raises(UserError, match="is not a regular file"):
        write_json_atomically(tmp_path / "out.json", {"a": 1}, option="--out")
    assert os.listdir(tmp_path) == ["out.json"] and not (tmp_path / "out.json").is_file()


def listing(directory):
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("kind", ["dir", "fifo"])
def test_calibrate_refuses_special_out_at_once(checkpoints, specials, tmp_path, kind):
    before = listing(tmp_path)
    start = time.monotonic()
    r = run_cli("calibrate.py", "--checkpoint", checkpoints["gqa"][0], "--out", specials[kind],
                "--device", "cpu", "--tokens", "100000")
    assert_one_line_error(r.returncode, r.stderr, f"--out {specials[kind]}")
    assert "Traceback" not in r.stderr and time.monotonic() - start < 60
    assert listing(tmp_path) == before and listing(specials["dir"]) == []
    assert (tmp_path / "fifo").is_fifo()


def test_generate_nan_temperature_end_to_end(checkpoints):
    r = run_cli("generate.py", "--checkpoint", checkpoints["gqa"][0], "--prompt", "hi", "--temperature", "nan")
    assert_one_line_error(r.returncode, r.stderr, "--temperature must be a finite number")


def test_generate_non_utf8_prompt_end_to_end(checkpoints):
    args = [sys.executable, "generate.py", "--checkpoint", str(checkpoints["gqa"][0]), "--prompt"]
    r = subprocess.run([*map(os.fsencode, args), b"caf\xe9"], cwd=ROOT, capture_output=True, timeout=300)
    assert_one_line_error(r.returncode, r.stderr.decode(), "--prompt has bytes that are not UTF-8")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_calibrate_interrupted_leaves_nothing(checkpoints, tmp_path, signum):
    """Signalled mid-run (the built-in text is long; the log line says the run has started):
    exit 130, one line saying so, and no thresholds file or temporary file anywhere near."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    process = subprocess.Popen([sys.executable, "calibrate.py", "--checkpoint", str(checkpoints["gqa"][0]),
                                "--out", str(out_dir / "t.json"), "--device", "cpu", "--tokens", "10000000",
                                "--seq-len", "64"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not inherited ignored
    try:
        first = process.stderr.readline()
        assert first.startswith("no --text given: calibrating"), first
        time.sleep(3)  # into the forward passes
        process.send_signal(signum)
        err = process.stderr.read()
        code = process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert code == 130, repr(err)
    assert err.strip().splitlines()[-1] == "interrupted: calibrate stopped, nothing written", err
    assert "Traceback" not in err
    assert listing(out_dir) == [] and not (checkpoints["gqa"][0] / "cats_thresholds.json").exists()
