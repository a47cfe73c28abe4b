"""The real SmolLM2-135M-Instruct, through our loader, against transformers' greedy decoding."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers_gguf import smollm2_converted, smollm2_gguf, transformers_gguf_model  # noqa: E402,F401

from catsgen.checkpoint import load_model  # noqa: E402
from catsgen.generate import generate  # noqa: E402
from catsgen.tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return transformers_gguf_model(smollm2_gguf)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_transformers(smollm2_converted, reference, prompt):
    tokenizer = Tokenizer(smollm2_converted)
    model = load_model(smollm2_converted, dtype=torch.float32)
    model.setup_caches(1, 256)
    ids = tokenizer.encode(prompt)
    ours = generate(model, ids, NEW_TOKENS).tokens[0]
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(ids):].tolist()
    assert len(tokenizer.decode(ours).split()) > 3  # real words, not an empty string
