"""Bad checkpoints and configs: clear errors naming the key, file or tensor."""

import shutil

import pytest
import torch

from catsgen.checkpoint import load_model
from catsgen.config import ModelConfig, preset
from catsgen.errors import UserError
from conftest import edit_config, edit_tensors, run_cli


def test_unsupported_architecture(checkpoint):
    edit_config(checkpoint, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UserError, match="architectures='GPT2LMHeadModel' is not supported"):
        ModelConfig.from_checkpoint(checkpoint)


def test_missing_required_key(checkpoint):
    edit_config(checkpoint, intermediate_size=None)
    with pytest.raises(UserError, match="required key 'intermediate_size' is missing"):
        ModelConfig.from_checkpoint(checkpoint)


def test_config_fields_are_read():
    config = ModelConfig.from_hf_dict({
        "architectures": ["MistralForCausalLM"], "hidden_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 100,
        "vocab_size": 50, "head_dim": 32, "sliding_window": None, "eos_token_id": [2, 5],
        "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "torch_dtype": "float16"})
    assert (config.head_dim, config.sliding_window, config.eos_token_ids) == (32, None, (2, 5))
    assert (config.rope_theta, config.tie_word_embeddings, config.torch_dtype) == (1e6, True, "float16")
    assert config.qkv_dim == (4 + 2 + 2) * 32


def test_unsupported_rope_type():
    with pytest.raises(UserError, match="rope_scaling type 'yarn' is not supported"):
        ModelConfig.from_hf_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8,
                                  "vocab_size": 8, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_presets_exist():
    assert preset("llama-2-7b").intermediate_size == 11008
    assert preset("mistral-7b").n_kv_heads == 8
    assert preset("llama-3-8b").vocab_size == 128256
    with pytest.raises(UserError, match="unknown preset"):
        preset("gpt-5")


def test_missing_tensor(checkpoint):
    edit_tensors(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        load_model(checkpoint)


def test_unexpected_tensor(checkpoint):
    edit_tensors(checkpoint, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(UserError, match="unexpected tensor model.layers.0.mlp.extra.weight"):
        load_model(checkpoint)


def test_shape_mismatch(checkpoint):
    def shrink(t):
        t["model.layers.0.mlp.gate_proj.weight"] = t["model.layers.0.mlp.gate_proj.weight"][:-1].clone()
    edit_tensors(checkpoint, shrink)
    with pytest.raises(UserError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight "
                                        r"has shape \(95, 64\), expected \(96, 64\)"):
        load_model(checkpoint)


def test_truncated_file(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(UserError, match="model.safetensors is not a readable safetensors file"):
        load_model(checkpoint)


def test_not_a_safetensors_file(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(checkpoint)


def test_missing_shard(checkpoints, tmp_path):
    directory = tmp_path / "sharded"
    shutil.copytree(checkpoints["sharded"][0], directory)
    (directory / "model-00002-of-00007.safetensors").unlink()
    with pytest.raises(UserError, match="model-00002-of-00007.safetensors is missing"):
        load_model(directory)


def test_pickle_only_checkpoint(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        load_model(checkpoint)


def test_cli_reports_load_error_in_one_line(checkpoint):
    edit_tensors(checkpoint, lambda t: t.pop("model.norm.weight"))
    result = run_cli("generate.py", "--checkpoint", checkpoint, "--prompt", "hi", "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {checkpoint}: tensor model.norm.weight is missing"
