"""Output files and directories: checked before the work, written atomically after it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable

from catsgen.errors import UserError


def check_writable_parent(path: Path, option: str):
    """Fail in a second, before a long run, when the output could not be written at its end."""
    parent = Path(path).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{option} {path}: directory {parent} does not exist or is not writable")


def check_output_file(path: Path, option: str):
    """An output file can be written at the end of the run: its directory is writable, and the
    target is absent or a regular file (a directory, FIFO, device or socket is never replaced)."""
    check_not_special(path, option)
    check_writable_parent(path, option)


def check_not_special(path: Path, option: str):
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory: give a file path")
    if path.exists() and not path.is_file():
        raise UserError(f"{option} {path} exists and is not a regular file (FIFO, device or socket): "
                        "refusing to replace it")


def write_json_atomically(path: Path, data: dict, indent: int = 1, option: str = "output"):
    """Temporary file beside the target, then os.replace: the target is whole or absent, never partial.
    The target is checked again at the last moment: it may have become a FIFO during a long run."""
    path = Path(path)
    check_not_special(path, option)
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=indent)
            f.flush()
            os.fsync(f.fileno())
        check_not_special(path, option)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_directory_atomically(out_dir: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """write(tmp) fills a temp dir next to out_dir, which is then renamed: out_dir is either complete
    or untouched. overwrite replaces a non-empty out_dir (otherwise that is a UserError)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: already exists and is not empty; remove it or choose another output directory")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create its parent directory ({e.strerror})") from None
    check_writable_parent(out_dir, "--out")
    with sigterm_as_interrupt():
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        old = None
        try:
            write(tmp)
            for f in tmp.iterdir():  # mkdtemp and save_file make private files; a cache may be shared
                os.chmod(f, 0o644)
            os.chmod(tmp, 0o755)
            if out_dir.is_dir():
                old = out_dir.with_name(tmp.name + ".old")
                os.rename(out_dir, old)
            os.rename(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not out_dir.exists():
                os.rename(old, out_dir)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside the block SIGTERM (kill, a job scheduler's stop) raises KeyboardInterrupt as Ctrl-C
    does, so cleanup code runs instead of the process vanishing with its temporary files. Only the
    main thread may set a signal handler; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
