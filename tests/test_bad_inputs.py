"""Damaged checkpoints (config.json, safetensors, tokenizer files): each is a one-line UserError
naming the file and the key or tensor, found when the data is read, never a traceback later.

Most cases call the loaders in this process (fast); a few run generate.py end to end."""

import json
import shutil

import pytest
import torch

from catsgen.checkpoint import load_model
from catsgen.config import ModelConfig
from catsgen.errors import UserError
from catsgen.tokenizer import Tokenizer
from conftest import VOCAB, assert_one_line_error, edit_config, edit_tensors, run_cli

NAN = float("nan")  # json.dumps writes NaN, and json.loads reads it back
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def base_config(checkpoints):
    return json.loads((checkpoints["gqa"][0] / "config.json").read_text())


# --- config.json ---------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size="64"), 'hidden_size must be a positive integer, not "64"'),
    (dict(hidden_size=[64]), "hidden_size must be a positive integer, not [64]"),
    (dict(hidden_size=-64), "hidden_size must be a positive integer, not -64"),
    (dict(hidden_size=True), "hidden_size must be a positive integer, not true"),
    (dict(hidden_size=64.0), "hidden_size must be a positive integer, not 64.0"),
    (dict(intermediate_size=-96), "intermediate_size must be a positive integer"),
    (dict(num_attention_heads=0), "num_attention_heads must be a positive integer, not 0"),
    (dict(num_hidden_layers=2**40), "num_hidden_layers must be a positive integer"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(max_position_embeddings=-1), "max_position_embeddings must be a positive integer"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps must be a positive finite number"),
    (dict(rms_norm_eps=NAN), "rms_norm_eps must be a positive finite number, not NaN"),
    (dict(rms_norm_eps=0), "rms_norm_eps must be a positive finite number"),
    (dict(eos_token_id="2"), "eos_token_id must be a token id or a list of token ids"),
    (dict(eos_token_id=[2, "x"]), "eos_token_id must be a token id or a list of token ids"),
    (dict(bos_token_id=-1), "bos_token_id must be a token id"),
    (dict(rope_theta=-10000.0), "rope_theta must be a positive finite number"),
    (dict(rope_theta=0), "rope_theta must be a positive finite number"),
    (dict(rope_parameters={"rope_theta": "big"}), "rope_parameters: rope_theta must be a positive finite number"),
    (dict(rope_parameters=[10000.0]), "rope_parameters must be a JSON object"),
    (dict(rope_scaling="linear"), 'rope_scaling must be a JSON object, not "linear"'),
    (dict(rope_scaling={"rope_type": "linear", "factor": -2}), "rope_scaling: factor must be a positive"),
    (dict(rope_scaling={"rope_type": 3, "factor": 2}), "rope_scaling: rope_type must be a string"),
    (dict(rope_scaling={**LLAMA3, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
     "low_freq_factor must be below high_freq_factor"),
    (dict(architectures="LlamaForCausalLM"), "architectures must be a non-empty list of strings"),
    (dict(tie_word_embeddings="no"), "tie_word_embeddings must be true or false"),
    (dict(num_key_value_heads=3), "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
    (dict(hidden_size=66, head_dim=None), "hidden_size (66) is not a multiple of num_attention_heads (4)"),
    (dict(head_dim=15), "the head dimension (15) is odd"),
    (dict(eos_token_id=[2, VOCAB]), f"must be below vocab_size ({VOCAB})"),
    (dict(architectures=["MistralForCausalLM"], sliding_window=0), "sliding_window must be a positive integer"),
])
def test_config_value_is_named(base_config, changes, message):
    with pytest.raises(UserError, match="^config.json: ") as error:
        ModelConfig.from_hf_dict({**base_config, **changes})
    assert message in str(error.value)


def test_null_means_unset(base_config):
    """transformers writes null for unset options: those take their defaults, they are not errors."""
    config = ModelConfig.from_hf_dict({**base_config, "head_dim": None, "rope_scaling": None,
                                       "sliding_window": None, "num_key_value_heads": None})
    assert (config.head_dim, config.n_kv_heads, config.rope_scaling) == (16, 4, None)


# --- safetensors and the JSON files beside them ---------------------------------------------------

@pytest.fixture
def sharded(checkpoints, tmp_path):
    directory = tmp_path / "sharded"
    shutil.copytree(checkpoints["sharded"][0], directory)
    return directory


Q = "model.layers.1.self_attn.q_proj.weight"


def relabel(name, dtype):
    """The same bytes under another header dtype (what a broken converter writes)."""
    return lambda t: t.update({name: t[name].view(dtype)})


def fill(name, value):
    return lambda t: t[name].view(-1)[5:7].fill_(value)


@pytest.mark.parametrize("edit, load_dtype, message", [
    # q_proj is fused with k and v by torch.cat: its shape must be checked before.
    (lambda t: t.update({Q: t[Q][:-4].clone()}), torch.float32,
     f"tensor {Q} has shape (60, 64), expected (64, 64) from config.json"),
    (relabel(Q, torch.int32), torch.float32, f"tensor {Q} has dtype I32; weights must be one of float16"),
    (relabel("model.norm.weight", torch.uint8), torch.float32, "tensor model.norm.weight has dtype U8"),
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].bool()}), torch.float32, "has dtype BOOL"),
    (fill("model.layers.0.mlp.up_proj.weight", NAN), torch.float32,
     "tensor model.layers.0.mlp.up_proj.weight has non-finite values in float32 (NaN or inf)"),
    # float32 values past float16's range would decode as inf: garbage text, no error, without the check.
    (fill("model.layers.0.mlp.down_proj.weight", 1e6), torch.float16,
     "tensor model.layers.0.mlp.down_proj.weight has non-finite values in float16 (beyond float16's range"),
])
def test_tensor_checked_before_use(checkpoint, edit, load_dtype, message):
    edit_tensors(checkpoint, edit)
    with pytest.raises(UserError, match="model.safetensors: ") as error:
        load_model(checkpoint, dtype=load_dtype)
    assert message in str(error.value)


def test_float64_weights_load(checkpoint, checkpoints):
    edit_tensors(checkpoint, lambda t: t.update({k: v.double() for k, v in t.items()}))
    ours = load_model(checkpoint, dtype=torch.float32)
    reference = load_model(checkpoints["gqa"][0], dtype=torch.float32)
    assert torch.equal(ours.layers[1].attention.wqkv.weight, reference.layers[1].attention.wqkv.weight)


@pytest.mark.parametrize("layers", [3, 1, 2**30])
def test_layer_count_differs_from_config(checkpoint, layers):
    edit_config(checkpoint, num_hidden_layers=layers)  # 2**30 must fail at once, not list 2**30 layers
    with pytest.raises(UserError, match=f"config.json: num_hidden_layers is {layers} but the checkpoint "
                                        "holds tensors for 2 layers"):
        load_model(checkpoint)


@pytest.mark.parametrize("keep_bytes", [4, 9, 200])
def test_safetensors_cut_in_its_header(checkpoint, keep_bytes):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep_bytes])
    with pytest.raises(UserError, match="model.safetensors is not a readable safetensors file"):
        load_model(checkpoint)


INDEX = "model.safetensors.index.json"


@pytest.mark.parametrize("file, content, message", [
    ("config.json", b"[]", "config.json must hold a JSON object, not []"),
    ("config.json", b"null", "config.json must hold a JSON object, not null"),
    ("config.json", b'{"hidden_size": 64,', "config.json is not valid JSON"),
    ("config.json", b'{"model_type": "llama\xff"}', "config.json is not UTF-8 text (at byte offset 21"),
    (INDEX, b'{"weight_map": ["model-00001-of-00007.safetensors"]}', ": weight_map must be an object of tensor name"),
    (INDEX, b'{"weight_map": {"model.norm.weight": 7}}', ": weight_map must be an object of tensor name"),
    (INDEX, b'{"weight_map": {"model.norm.weight": "../../etc/passwd"}}', ": shard '../../etc/passwd' is outside"),
    (INDEX, b'{"weight_map": {"model.norm.weight": "/etc/passwd"}}', ": shard '/etc/passwd' is outside"),
    (INDEX, b'{"weight_map": {', " is not valid JSON"),
    (INDEX, b'{"weight_map": {"\xff": "a"}}', " is not UTF-8 text"),
    (INDEX, b"[]", " must hold a JSON object"),
])
def test_json_file_content(sharded, file, content, message):
    (sharded / file).write_bytes(content)
    with pytest.raises(UserError) as error:
        load_model(sharded)
    assert str(error.value).startswith(f"{sharded / file}") and message in str(error.value)


def test_index_names_the_wrong_shard(sharded):
    index = json.loads((sharded / INDEX).read_text())
    holder = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = next(f for f in index["weight_map"].values() if f != holder)
    (sharded / INDEX).write_text(json.dumps(index))
    with pytest.raises(UserError, match="tensor model.norm.weight cannot be read"):
        load_model(sharded)


def test_truncated_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[3]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match=f"{shard.name} is not a readable safetensors file"):
        load_model(sharded)


# --- tokenizer files -----------------------------------------------------------------------------

def half(path):
    return path.read_bytes()[: len(path.read_bytes()) // 2]


@pytest.mark.parametrize("file, content, message", [
    ("tokenizer.json", lambda p: b"garbage", "tokenizer.json is not a valid tokenizer.json"),
    ("tokenizer.json", lambda p: b"{}", "tokenizer.json is not a valid tokenizer.json"),
    ("tokenizer.json", lambda p: b"[]", "tokenizer.json is not a valid tokenizer.json"),
    ("tokenizer.json", half, "tokenizer.json is not a valid tokenizer.json (EOF"),
    ("tokenizer.json", lambda p: b"\xff\xfe{}", "tokenizer.json is not UTF-8 text"),
    ("tokenizer_config.json", lambda p: b"\xc3(", "tokenizer_config.json is not UTF-8 text"),
    ("tokenizer_config.json", lambda p: b'"chat"', "tokenizer_config.json must hold a JSON object, not \"chat\""),
    ("tokenizer_config.json", lambda p: b'{"chat_template": 5}', "chat_template must be a string"),
    ("tokenizer_config.json", lambda p: b'{"eos_token": {"id": 2}}', "eos_token must be a string or an object"),
    ("tokenizer_config.json", lambda p: b'{"add_bos_token": "yes"}', "add_bos_token must be true or false"),
    ("generation_config.json", lambda p: b'{"eos_token_id": "2"}', "generation_config.json: eos_token_id must be"),
    ("generation_config.json", lambda p: b'{"bos_token_id": 5000}', f"below config.json's vocab_size ({VOCAB})"),
    ("generation_config.json", lambda p: b"\x80", "generation_config.json is not UTF-8 text"),
])
def test_tokenizer_file(checkpoint, file, content, message):
    path = checkpoint / file
    path.write_bytes(content(path))
    with pytest.raises(UserError, match=f"^{checkpoint / file}") as error:
        Tokenizer(checkpoint)
    assert message in str(error.value)


def test_sentencepiece_model_garbage(checkpoint):
    (checkpoint / "tokenizer.json").unlink()
    (checkpoint / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model")
    with pytest.raises(UserError, match="tokenizer.model is not a valid sentencepiece model"):
        Tokenizer(checkpoint)


def test_tokenizer_ids_beyond_vocab_size(checkpoint):
    """An added token past the embedding table: caught at load, not as an IndexError mid-run."""
    from tokenizers import Tokenizer as HFTokenizer
    tok = HFTokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>"])
    tok.save(str(checkpoint / "tokenizer.json"))
    with pytest.raises(UserError, match=f"tokenizer.json has token id {VOCAB}, but config.json's "
                                        f"vocab_size is {VOCAB}: tokenizer and model do not match"):
        Tokenizer(checkpoint)


def with_template(checkpoint, template):
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
    return Tokenizer(checkpoint)


@pytest.mark.parametrize("template, message", [
    ("{% if %}", "TemplateSyntaxError"),
    ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
    ("{{ messages[0]['content'] / 0 }}", "TypeError"),
    ("{{ messages[5]['content'] }}", "UndefinedError"),
    # The template is the checkpoint author's code: no way out of the sandbox.
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
])
def test_chat_template_failure(checkpoint, template, message):
    tokenizer = with_template(checkpoint, template)
    with pytest.raises(UserError, match="--chat: the chat_template in .*tokenizer_config.json failed: ") as error:
        tokenizer.apply_chat_template("hi")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_chat_template_list_form(checkpoint):
    """transformers' several-templates form: the one named default is used."""
    default = "<u>{{ messages[0]['content'] }}{{ eos_token }}"
    tokenizer = with_template(checkpoint, [{"name": "tool_use", "template": "tools"},
                                           {"name": "default", "template": default}])
    assert tokenizer.apply_chat_template("hi") == "<u>hi</s>"


def test_chat_template_file(checkpoint):
    """transformers >= 4.43 saves the template as chat_template.jinja beside tokenizer_config.json."""
    (checkpoint / "chat_template.jinja").write_text("<u>{{ messages[0]['content'] }}")
    assert Tokenizer(checkpoint).apply_chat_template("hi") == "<u>hi"
    (checkpoint / "chat_template.jinja").write_bytes(b"<u>\xff")
    with pytest.raises(UserError, match="chat_template.jinja is not UTF-8 text"):
        Tokenizer(checkpoint)


# --- end to end: exit code 2, one line, no traceback ----------------------------------------------

def damage_config(directory):
    edit_config(directory, hidden_size="64")


def damage_tensor(directory):
    edit_tensors(directory, relabel(Q, torch.int32))


def damage_tokenizer(directory):
    (directory / "tokenizer.json").write_bytes(half(directory / "tokenizer.json"))


def damage_template(directory):
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no') }}"}))


@pytest.mark.parametrize("damage, message", [
    (damage_config, "config.json: hidden_size must be a positive integer"),
    (damage_tensor, f"model.safetensors: tensor {Q} has dtype I32"),
    (damage_tokenizer, "tokenizer.json is not a valid tokenizer.json"),
    (damage_template, "tokenizer_config.json failed: TemplateError: no"),
])
def test_generate_cli_reports_damage(checkpoint, damage, message):
    damage(checkpoint)
    result = run_cli("generate.py", "--checkpoint", checkpoint, "--prompt", "x", "--max-new-tokens", 2,
                     "--device", "cpu", "--chat")
    assert "Traceback" not in result.stderr
    assert_one_line_error(result.returncode, result.stderr, message)
