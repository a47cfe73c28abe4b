"""Shared fixtures: small random HF checkpoints written by transformers' save_pretrained."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `python -m pytest` puts the repository root on sys.path, where kernels/ (installed as
# catsgen.kernels) would shadow Hugging Face's `kernels` package, which transformers imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import torch  # noqa: E402

# On a machine without CUDA the Triton kernels run in Triton's interpreter, which must be chosen
# before triton is first imported (catsgen.model imports the kernels): set it here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

VOCAB = 320
TRAINING_TEXT = ("The quick brown fox jumps over the lazy dog. Sparse activations skip weights. "
                 "Once upon a time, in a land of static caches and fused kernels, a model decoded "
                 "tokens one by one, 0123456789, and everyone was happy. ") * 20


def write_tokenizer(directory: Path):
    """A byte-level BPE tokenizer.json trained on a tiny text, so the CLI can take prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TRAINING_TEXT], trainer)
    tok.save(str(directory / "tokenizer.json"))
    return tok


CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "llama31_rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                         rope_theta=500000.0),
    "tied": dict(tie_word_embeddings=True, num_key_value_heads=1),
    "tied_gqa": dict(tie_word_embeddings=True, num_key_value_heads=2),  # shards over 2 ranks
    "mistral_window": dict(sliding_window=7, num_key_value_heads=2, mistral=True),
    "sharded": dict(num_key_value_heads=2, shard=True),
}


def make_checkpoint(directory: Path, name: str, seed: int = 0):
    """Save a small random Llama/Mistral with transformers and return (directory, hf_model)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    options = dict(CONFIGS[name])
    mistral, shard = options.pop("mistral", False), options.pop("shard", False)
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, bos_token_id=1,
                eos_token_id=2, rms_norm_eps=1e-5)
    base.update(options)
    torch.manual_seed(seed)
    config_cls, model_cls = (MistralConfig, MistralForCausalLM) if mistral else (LlamaConfig, LlamaForCausalLM)
    model = model_cls(config_cls(**base)).eval()
    # Scale weights up so that greedy decoding is decisive rather than a sea of near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(directory, max_shard_size="60KB" if shard else "5GB")
    write_tokenizer(directory)
    return directory, model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> (directory, transformers model), built once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: make_checkpoint(root / name, name) for name in CONFIGS}


@pytest.fixture(scope="session")
def calibrated(checkpoints, tmp_path_factory):
    """The gqa checkpoint calibrated once per session: (checkpoint dir, thresholds path with the
    greedy and fisher allocations, the same file without allocations (as made before they
    existed, or with none searched), the table)."""
    from helpers_cats import calibrate_quietly
    directory = checkpoints["gqa"][0]
    path = tmp_path_factory.mktemp("calibrated") / "thresholds.json"
    table = calibrate_quietly(directory, path, allocation_tokens=64, fisher_tokens=256)
    old = path.parent / "old.json"
    data = json.loads(path.read_text())
    del data["allocations"]
    old.write_text(json.dumps(data))
    return directory, path, old, table


def run_cli(*args, env=None, timeout=600):
    """Run an entry script (generate.py, calibrate.py, bench.py) or `-m catsgen.cli` in a fresh process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=full_env, timeout=timeout)


@pytest.fixture
def checkpoint(checkpoints, tmp_path):
    """A private copy of the gqa checkpoint, to damage."""
    directory = tmp_path / "ck"
    shutil.copytree(checkpoints["gqa"][0], directory)
    return directory


def edit_config(directory, **changes):
    """Change config.json's keys; None removes a key."""
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


def edit_tensors(directory, edit, file="model.safetensors"):
    """Apply edit(dict of tensors) to a safetensors file and save it back."""
    from safetensors.torch import load_file, save_file
    path = directory / file
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def assert_one_line_error(code, err, *fragments):
    """The CLI's answer to bad input: exit code 2, one `error: ...` line naming what is wrong."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
