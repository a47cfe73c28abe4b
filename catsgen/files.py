"""Output files: checked before the work, written atomically after it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from catsgen.errors import UserError


def check_writable_parent(path: Path, option: str):
    """Fail in a second, before a long run, when the output could not be written at its end."""
    parent = Path(path).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{option} {path}: directory {parent} does not exist or is not writable")


def write_json_atomically(path: Path, data: dict, indent: int = 1):
    """Temporary file beside the target, then os.replace: the target is whole or absent, never partial."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
