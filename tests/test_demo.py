"""The demo path a newcomer runs, end to end on CPU: no --checkpoint, so the packaged SmolLM2
GGUF is converted into the cache, calibrated once, then generated from dense and at 50% CATS."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import run_cli

PROMPT = "The three primary colors are"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    env = {"CATSGEN_CACHE": str(tmp_path_factory.mktemp("cache"))}
    runs = {s: run_cli("generate.py", "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS,
                       "--device", "cpu", "--sparsity", s, env=env, timeout=1800)  # 0.5: calibrates first
            for s in ("0", "0.5")}
    return env["CATSGEN_CACHE"], runs


def test_first_use_converts_and_calibrates_once(demo_runs):
    cache, runs = demo_runs
    assert runs["0"].returncode == 0, runs["0"].stderr
    assert "converting" in runs["0"].stderr
    assert runs["0.5"].returncode == 0, runs["0.5"].stderr
    assert "calibrating it once" in runs["0.5"].stderr and "converting" not in runs["0.5"].stderr
    thresholds = json.loads(open(f"{cache}/SmolLM2-135M-Instruct/cats_thresholds.json").read())
    assert thresholds["model"]["n_layers"] == 30
    assert thresholds["calibration"]["texts"][0]["name"].startswith("pydoc_data.topics")


def test_outputs_are_english_and_sparsity_is_reported(demo_runs):
    _, runs = demo_runs
    for s, run in runs.items():
        words = run.stdout.split()
        assert len(words) >= 5, run.stdout
        assert sum(w.strip(".,;:!?\"'()").isalpha() for w in words) >= 0.6 * len(words), run.stdout
        assert "tok/s" in run.stderr
    assert "overall" in runs["0.5"].stderr.lower()


def test_dense_demo_equals_transformers_greedy(demo_runs):
    cache, runs = demo_runs
    directory = f"{cache}/SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert runs["0"].stdout.rstrip("\n") == expected
