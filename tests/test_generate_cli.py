"""generate.py end to end against transformers' greedy decoding, and its one-line errors."""

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from conftest import CONFIGS, run_cli

PROMPT = "Once upon a time, the quick brown fox"
NEW_TOKENS = 40


def hf_greedy_text(directory, hf_model, prompt, new_tokens):
    tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    ids = torch.tensor([tok.encode(prompt).ids])
    with torch.no_grad():
        out = hf_model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:].tolist())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cli_greedy_equals_transformers(checkpoints, name):
    directory, hf = checkpoints[name]
    # No EOS in this test: 40 tokens are compared even if the random model emits </s>.
    work = directory.parent / f"{name}_noeos"
    if not work.exists():
        shutil.copytree(directory, work)
        config = json.loads((work / "config.json").read_text())
        config["eos_token_id"] = None
        (work / "config.json").write_text(json.dumps(config))
        (work / "generation_config.json").unlink()
    result = run_cli("generate.py", "--checkpoint", work, "--prompt", PROMPT,
                     "--max-new-tokens", NEW_TOKENS, "--device", "cpu", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    expected = hf_greedy_text(directory, hf, PROMPT, NEW_TOKENS)
    assert result.stdout.rstrip("\n") == expected
    assert f"{NEW_TOKENS} new tokens" in result.stderr and "torch (CPU), eager]" in result.stderr


def test_sampling_is_seeded_and_respects_top_k(checkpoints):
    directory = checkpoints["gqa"][0]
    args = ["generate.py", "--checkpoint", directory, "--prompt", PROMPT, "--max-new-tokens", 12,
            "--temperature", 1.0, "--top-k", 5, "--top-p", 0.9, "--device", "cpu"]
    first, second = run_cli(*args, "--seed", 7), run_cli(*args, "--seed", 7)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_sample_top_k_one_is_greedy():
    from catsgen.generate import SamplingParams, sample
    logits = torch.randn(3, 50)
    picked = sample(logits, SamplingParams(temperature=1.0, top_k=1))
    assert torch.equal(picked[:, 0], logits.argmax(-1))


def test_sample_top_p_keeps_only_the_nucleus():
    from catsgen.generate import SamplingParams, sample
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    draws = {int(sample(logits, SamplingParams(temperature=1.0, top_p=0.8))) for _ in range(200)}
    assert draws == {0, 1}


def test_help_documents_every_option():
    result = run_cli("generate.py", "--help")
    assert result.returncode == 0
    for option in ("--checkpoint", "--prompt", "--max-new-tokens", "--temperature", "--top-k",
                   "--top-p", "--seed", "--device", "--dtype", "--max-seq-len", "--chat", "--sparsity"):
        assert option in result.stdout


def assert_user_error(result, fragment):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr


def test_missing_directory(tmp_path):
    result = run_cli("generate.py", "--checkpoint", tmp_path / "nope", "--prompt", "hi", "--device", "cpu")
    assert_user_error(result, "does not exist")


def test_directory_without_config(tmp_path):
    result = run_cli("generate.py", "--checkpoint", tmp_path, "--prompt", "hi", "--device", "cpu")
    assert_user_error(result, "has no config.json")


def test_bad_dtype(checkpoints):
    result = run_cli("generate.py", "--checkpoint", checkpoints["gqa"][0], "--prompt", "hi",
                     "--device", "cpu", "--dtype", "float8")
    assert_user_error(result, "unknown dtype 'float8'")


def test_prompt_longer_than_max_seq_len(checkpoints):
    result = run_cli("generate.py", "--checkpoint", checkpoints["gqa"][0], "--prompt", PROMPT * 5,
                     "--device", "cpu", "--max-seq-len", 16)
    assert_user_error(result, "longer than --max-seq-len 16")


def test_chat_without_template(checkpoints):
    result = run_cli("generate.py", "--checkpoint", checkpoints["gqa"][0], "--prompt", "hi",
                     "--device", "cpu", "--chat")
    assert_user_error(result, "has no chat_template")
