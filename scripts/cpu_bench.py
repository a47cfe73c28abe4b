"""CPU decode speed of the default model (SmolLM2-135M-Instruct, float32, greedy), in one process so
that every number shares the machine's load: transformers' generate, catsgen dense, catsgen CATS-50%,
and the default model's first calibration by phase. Run through scripts/cpu_bench.sh."""

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from catsgen.calibrate import calibrate
from catsgen.cats import SparsityCounter, measure_generation_sparsity, set_dense, set_sparsity
from catsgen.cli import configure_logging
from catsgen.default_model import DEFAULT_CALIBRATION_TOKENS, DEFAULT_FISHER_TOKENS, default_checkpoint
from catsgen.generate import generate, load_for_generation
from catsgen.settings import CalibrateSettings

PROMPT = "Explain in two sentences why the sky is blue."
NEW_TOKENS, ROUNDS = int(os.environ.get("NEW_TOKENS", 64)), int(os.environ.get("ROUNDS", 3))


def decode_rates(engines: dict) -> dict:
    """Decode tok/s of each engine (name -> (prepare, run)), every engine timed alike:
    (N - 1) / (time of N new tokens - time of 1), each the best of ROUNDS, so that prefill and the
    first step drop out the same way for all. The rounds go round the engines in turn (A, B, C,
    A, B, C, ...): a change in the machine's load then falls on every engine alike, where one
    engine's rounds after another's would each catch a different moment."""
    times = {name: {1: [], NEW_TOKENS: []} for name in engines}
    tokens = {}
    for _ in range(ROUNDS):
        for name, (prepare, run) in engines.items():
            prepare()  # outside the timing: dense and CATS share one model
            for n in (1, NEW_TOKENS):
                start = time.perf_counter()
                tokens[name] = run(n)
                times[name][n].append(time.perf_counter() - start)
    return {name: ((NEW_TOKENS - 1) / (min(t[NEW_TOKENS]) - min(t[1])), tokens[name]) for name, t in times.items()}


def main():
    configure_logging()
    phases = []
    logging.getLogger("catsgen").addHandler(type("Keep", (logging.Handler,), {
        "emit": lambda self, r: phases.append(r.getMessage()) if r.getMessage().startswith("calibration took") else None})())
    checkpoint = default_checkpoint()
    with tempfile.TemporaryDirectory() as folder:
        table = calibrate(checkpoint, CalibrateSettings(tokens=DEFAULT_CALIBRATION_TOKENS, allocation_tokens=0,
                                                        fisher_tokens=DEFAULT_FISHER_TOKENS, out=Path(folder) / "t.json"))
    model, tokenizer = load_for_generation(checkpoint, "cpu", torch.float32, 1, 2048)
    ids = tokenizer.encode(PROMPT)
    hf = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    hf_ids = torch.tensor([ids])

    def hf_run(n):
        with torch.no_grad():
            out = hf.generate(hf_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(ids):].tolist()

    def ours(n):
        return generate(model, ids, n).tokens[0]

    rates = decode_rates({"transformers generate (dense)": (lambda: None, hf_run),
                          "catsgen dense": (lambda: set_dense(model), ours),
                          "catsgen CATS-50% (fisher)": (lambda: set_sparsity(model, table, 0.5, "fisher"), ours)})
    rows = [(name, *rate) for name, rate in rates.items()]
    counter = measure_generation_sparsity(model, ids, rows[-1][2], SparsityCounter(model.config.n_layers, 0.5))
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"\nSmolLM2-135M-Instruct, float32, CPU, {torch.get_num_threads()} torch threads, greedy, "
          f"{len(ids)} prompt tokens, {NEW_TOKENS} new tokens, best of {ROUNDS} interleaved rounds; load average {load} on "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    for name, rate, _ in rows:
        print(f"  {name:<30} {rate:6.1f} tok/s  ({rate / rows[0][1]:.2f}x transformers)")
    # transformers is held to N tokens (min_new_tokens masks EOS), catsgen runs on: compare up to EOS
    ours_text = next((rows[1][2][:i] for i, t in enumerate(rows[1][2]) if t in tokenizer.eos_ids), rows[1][2])
    same = rows[0][2][:len(ours_text)] == ours_text
    print(f"  CATS-50% measured sparsity {counter.overall():.3f}; catsgen dense tokens "
          f"{'equal' if same else 'DIFFER from'} transformers' (up to EOS)")
    print(f"  {phases[-1]}")


if __name__ == "__main__":
    sys.exit(main())
