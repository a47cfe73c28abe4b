"""CATS on the real SmolLM2-135M-Instruct: calibrated sparsity is reached on the calibration text
and close on another text; dense perplexity equals transformers'; s = 0 is the dense model.
Token counts are small (CPU, about 0.3 GFLOP per token)."""

import math

import pytest
import torch

from catsgen import cats
from catsgen.checkpoint import load_model
from catsgen.generate import apply_sparsity
from catsgen.perplexity import perplexity
from catsgen.text_sample import TextSource, text_sources, token_stream, windows
from catsgen.tokenizer import Tokenizer
from helpers_cats import calibrate_quietly, stdlib_docstrings
from helpers_gguf import smollm2_converted, smollm2_gguf  # noqa: F401  (session fixtures)

TOKENS, SEQ_LEN = 1024, 256


@pytest.fixture(scope="module")
def smollm2(smollm2_converted, tmp_path_factory):  # noqa: F811
    """(checkpoint, model, tokenizer, thresholds calibrated on the first TOKENS of the built-in text)."""
    path = tmp_path_factory.mktemp("smollm2_cats") / "thresholds.json"
    table = calibrate_quietly(smollm2_converted, path, tokens=TOKENS, seq_len=SEQ_LEN)
    return smollm2_converted, load_model(smollm2_converted, dtype=torch.float32), Tokenizer(smollm2_converted), table


def token_windows(tokenizer, sources, max_tokens=TOKENS):
    return list(windows(token_stream(sources, tokenizer), SEQ_LEN, max_tokens))


def docstring_source():
    text = stdlib_docstrings()
    return TextSource("stdlib docstrings", len(text.encode()), lambda: iter([text]))


@torch.no_grad()
def measured(model, table, sparsity, token_windows_):
    cats.set_sparsity(model, table, sparsity)
    counter = cats.SparsityCounter(model.config.n_layers, sparsity)
    with cats.counting(model, counter):
        for w in token_windows_:
            model(torch.tensor([w]))
    return counter.overall()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsity_on_the_calibration_text(smollm2, sparsity):
    _, model, tokenizer, table = smollm2
    actual = measured(model, table, sparsity, token_windows(tokenizer, text_sources(None)))
    assert abs(actual - sparsity) <= 0.02


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsity_on_another_text(smollm2, sparsity):
    _, model, tokenizer, table = smollm2
    actual = measured(model, table, sparsity, token_windows(tokenizer, [docstring_source()]))
    assert abs(actual - sparsity) <= 0.06


def test_sparsity_zero_logits_are_bit_identical(smollm2):
    directory, model, tokenizer, table = smollm2
    idx = torch.tensor([tokenizer.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        cats.set_dense(model)
        dense = model(idx)
        cats.set_sparsity(model, table, 0.5)
        assert not torch.equal(model(idx), dense)
        assert apply_sparsity(model, directory, 0.0, None) is None
        assert torch.equal(model(idx), dense)


def test_dense_perplexity_equals_transformers(smollm2):
    """Same windows, same convention: transformers' mean loss per window, token-weighted."""
    from transformers import LlamaForCausalLM
    directory, model, tokenizer, _ = smollm2
    cats.set_dense(model)
    token_windows_ = token_windows(tokenizer, [docstring_source()], max_tokens=2 * SEQ_LEN)
    ours, scored = perplexity(model, token_windows_)
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    nll = 0.0
    with torch.no_grad():
        for w in token_windows_:
            ids = torch.tensor([w])
            nll += hf(input_ids=ids, labels=ids).loss.item() * (len(w) - 1)
    theirs = math.exp(nll / scored)
    assert scored == 2 * (SEQ_LEN - 1)
    assert ours == pytest.approx(theirs, rel=0.005)
    assert 1 < ours < 100  # a working model on English prose
