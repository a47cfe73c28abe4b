"""Hugging Face model ids (`meta-llama/Llama-2-7b-hf`) resolved from the local hub cache, offline.

Users of transformers expect `--checkpoint ORG/NAME` to work for a model they already downloaded.
huggingface_hub's own cache lookup does it (it honours HF_HOME / HF_HUB_CACHE and the refs/ and
snapshots/ layout); it is called with local_files_only, so nothing is ever downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from catsgen.errors import UserError

# ORG/NAME as the hub spells repository ids: letters, digits, '-', '_', '.'; no leading '.'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_model_id(value: str) -> bool:
    return bool(_REPO_ID.match(value)) and ".." not in value


def resolve_model_id(model_id: str) -> Path:
    """The cached snapshot directory of `model_id` (revision main); a one-line error if absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    # Read at call time: huggingface_hub reads its variables once, when first imported.
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    try:
        return Path(snapshot_download(model_id, local_files_only=True, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise UserError(f"--checkpoint {model_id}: not a directory, and not in the local Hugging Face cache; "
                        f"download it first (`huggingface-cli download {model_id}`) or pass its directory") from None


def resolve_checkpoint_arg(value: Path) -> Path:
    """A directory as given, or a model id found in the local hub cache."""
    if value.is_dir() or value.exists() or not looks_like_model_id(str(value)):
        return value
    return resolve_model_id(str(value))
