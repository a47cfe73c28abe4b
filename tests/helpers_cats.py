"""Helpers for the CATS tests: a second real text, the CLI run in-process, a calibrated tiny model."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

# Stdlib API docstrings: real English prose shipped with Python, and a different text from the
# language reference in pydoc_data.topics that calibration uses by default.
DOCSTRING_MODULES = ("argparse", "subprocess", "threading", "logging", "collections", "email.message",
                     "http.client", "unittest.case", "tarfile", "zipfile", "pathlib", "asyncio.tasks")


def stdlib_docstrings() -> str:
    parts = []
    for name in DOCSTRING_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name:
                parts.append(inspect.getdoc(obj) or "")
    text = "\n\n".join(p for p in parts if p)
    if len(text) < 20000:
        pytest.fail("this Python has no docstrings (run without -OO)")
    return text


def run_main(capsys, *args) -> tuple[int, str, str]:
    """catsgen.cli.main in this process: (exit code, stdout, stderr)."""
    from catsgen.cli import main
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def calibrate_quietly(checkpoint: Path, out: Path, tokens: int = 512, seq_len: int = 128, texts=None,
                      allocation_tokens: int = 0, fisher_tokens: int = 0):
    """Without the allocation searches by default: most tests need thresholds only, fast."""
    from catsgen.calibrate import calibrate
    from catsgen.settings import CalibrateSettings
    return calibrate(checkpoint, CalibrateSettings(texts=texts, tokens=tokens, seq_len=seq_len, out=out,
                                                   allocation_tokens=allocation_tokens, fisher_tokens=fisher_tokens))
