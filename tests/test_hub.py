"""--checkpoint ORG/NAME resolved from a local Hugging Face cache laid out as huggingface_hub lays it."""

import shutil

import pytest

from catsgen.errors import UserError
from catsgen.hub import looks_like_model_id, resolve_checkpoint_arg


def make_hub_cache(root, model_id, source_dir, commit="0123456789abcdef0123456789abcdef01234567"):
    """models--ORG--NAME/refs/main -> commit, snapshots/<commit>/<files> (blobs are optional)."""
    repo = root / ("models--" + model_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source_dir, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_model_id_resolves_from_cache(tmp_path, monkeypatch, checkpoints):
    cache = tmp_path / "hub"
    snapshot = make_hub_cache(cache, "acme/tiny-llama", checkpoints["gqa"][0])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint_arg(type(tmp_path)("acme/tiny-llama")) == snapshot


def test_uncached_model_id_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve_checkpoint_arg(type(tmp_path)("acme/not-there"))


def test_directories_win_over_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "local").mkdir(parents=True)
    assert resolve_checkpoint_arg(type(tmp_path)("acme/local")) == type(tmp_path)("acme/local")
    assert looks_like_model_id("meta-llama/Llama-2-7b-hf")
    assert not looks_like_model_id("../x/y") and not looks_like_model_id("/abs/path")


def test_generate_cli_takes_a_cached_model_id(tmp_path, checkpoints):
    """End to end: generate.py --checkpoint ORG/NAME, from a cache built here, gives what the
    directory itself gives; nothing is downloaded (offline)."""
    from conftest import run_cli
    directory = checkpoints["gqa"][0]
    make_hub_cache(tmp_path / "hub", "acme/tiny-llama", directory)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    args = ["--prompt", "Once upon a time", "--max-new-tokens", 8, "--device", "cpu"]
    by_id = run_cli("generate.py", "--checkpoint", "acme/tiny-llama", *args, env=env)
    by_directory = run_cli("generate.py", "--checkpoint", directory, *args, env=env)
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_directory.stdout and by_id.stdout.strip()
    missing = run_cli("generate.py", "--checkpoint", "acme/not-there", *args, env=env)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        "error: --checkpoint acme/not-there: not a directory, and not in the local Hugging Face cache; "
        "download it first (`huggingface-cli download acme/not-there`) or pass its directory"]
