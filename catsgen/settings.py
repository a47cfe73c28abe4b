"""One settings object per command: its defaults (the CLI's option defaults come from here) and
its validation, done once where the values enter (the CLI, or a caller building one in Python).

Kept free of torch so that `catsgen --help` stays fast: dtypes are names, resolved by the command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from catsgen.errors import UserError
from catsgen.thresholds import check_allocation, check_sparsity


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(name: str, value: int, low: int):
    if value < low:
        raise UserError(f"{_option(name)} must be >= {low}, got {value}")


def _finite(name: str, value: float):
    if not math.isfinite(value):  # NaN passes every comparison test below
        raise UserError(f"{_option(name)} must be a finite number, got {value}")


def _utf8(name: str, text: str):
    """Arguments with bytes that are not UTF-8 arrive with surrogate escapes (PEP 383), which
    tokenizers cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{_option(name)} has bytes that are not UTF-8 (at character {e.start}): "
                        "pass UTF-8 text") from None


QUANTIZATIONS = ("none", "int8")  # weight-only quantization at load (catsgen/linear.py)


@dataclass
class RunSettings:
    """Where a command runs: filled in by resolve_device / resolve_dtype (cli.py) before use."""
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    quantize: str = "none"  # "int8": decoder linears int8 per output channel; LM head, embeddings in dtype

    def check_quantize(self):
        if self.quantize not in QUANTIZATIONS:
            raise UserError(f"unknown --quantize {self.quantize!r} (choose from: {', '.join(QUANTIZATIONS)})")

    def torch_dtype(self):
        """The dtype to load with (None: the loader's default)."""
        from catsgen.checkpoint import parse_dtype
        return parse_dtype(self.dtype) if self.dtype else None


@dataclass
class GenerateSettings(RunSettings):
    prompt: str = ""
    max_new_tokens: int = 200
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    max_seq_len: int = 2048
    chat: bool = False
    sparsity: float = 0.0
    thresholds_path: Path | None = None  # None: cats_thresholds.json next to the checkpoint
    allocation: str | None = None  # None: the best the thresholds file has
    compile: bool | None = None  # None: on for cuda, off for cpu

    def validate(self):
        _utf8("prompt", self.prompt)
        _finite("temperature", self.temperature)
        _at_least("temperature", self.temperature, 0)
        if self.top_k is not None:
            _at_least("top_k", self.top_k, 1)
        if self.top_p is not None and not 0 < self.top_p <= 1:  # also rejects NaN
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**64:  # what torch.manual_seed takes, without its negative range
            raise UserError(f"--seed must be in [0, 2**64 - 1], got {self.seed}")
        _at_least("max_new_tokens", self.max_new_tokens, 1)
        _at_least("max_seq_len", self.max_seq_len, 1)
        check_sparsity(self.sparsity)
        check_allocation(self.allocation)
        self.check_quantize()


@dataclass
class CalibrateSettings(RunSettings):
    texts: list[Path] | None = None  # None: the built-in sample (pydoc_data.topics)
    tokens: int = 65536
    seq_len: int = 512
    out: Path | None = None  # None: cats_thresholds.json next to the checkpoint
    allocation_tokens: int = 256  # KL curves cost layers x 4 grid points forwards of these
    # Fisher statistics: one forward and backward of these, and every token's per-neuron values in
    # memory (tokens x intermediate_size x layers x 8 bytes: 1.5 GB for SmolLM2 at 4096).
    fisher_tokens: int = 4096

    def validate(self):
        _at_least("tokens", self.tokens, 1)
        _at_least("seq_len", self.seq_len, 1)
        _at_least("allocation_tokens", self.allocation_tokens, 0)
        _at_least("fisher_tokens", self.fisher_tokens, 0)
        self.check_quantize()


@dataclass
class PerplexitySettings(RunSettings):
    texts: list[Path] | None = None
    sparsities: list[float] = field(default_factory=lambda: [0.0])
    thresholds_path: Path | None = None
    allocations: list[str | None] = field(default_factory=lambda: [None])  # None: the file's best
    max_tokens: int = 16384
    seq_len: int = 512

    def validate(self):
        _at_least("max_tokens", self.max_tokens, 2)
        _at_least("seq_len", self.seq_len, 2)
        for s in self.sparsities:
            check_sparsity(s)
        for a in self.allocations:
            check_allocation(a)
        self.check_quantize()


@dataclass
class BenchSettings(RunSettings):
    sparsities: list[float] = field(default_factory=lambda: [0.0, 0.5, 0.7])
    batch_size: int = 1
    prompt_len: int = 128
    new_tokens: int = 256
    max_seq_len: int = 2048
    repeats: int = 5
    compile: bool | None = None
    warmup_tokens: int = 8
    thresholds_path: Path | None = None
    allocation: str | None = None  # presets (random weights): uniform only

    def validate(self):
        if not 1 <= self.batch_size <= 8:
            raise UserError(f"--batch-size must be in [1, 8], got {self.batch_size}")
        _at_least("prompt_len", self.prompt_len, 1)
        _at_least("new_tokens", self.new_tokens, 3)
        _at_least("max_seq_len", self.max_seq_len, 2)
        _at_least("repeats", self.repeats, 1)
        if self.prompt_len + self.new_tokens > self.max_seq_len:  # found now, not after building the model
            raise UserError(f"--prompt-len {self.prompt_len} + --new-tokens {self.new_tokens} exceeds "
                            f"--max-seq-len {self.max_seq_len}")
        for s in self.sparsities:
            check_sparsity(s)
        check_allocation(self.allocation)
        self.check_quantize()
