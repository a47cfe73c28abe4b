"""Calibration x evaluation matrix of CATS allocations over offline texts (issue 19).

For every calibration text C, `python calibrate.py --text C` writes a thresholds file; for every
evaluation text E, `catsgen perplexity --json` scores dense, uniform, greedy and fisher at each S on
E with C's file. Methods other than uniform are re-scored at a corrected requested sparsity until
their measured actual sparsity is within --match of uniform's in the same cell (a secant search on
requested vs actual sparsity), so a cell compares the same bytes read. Everything goes through the
command line only, so the script does not depend on catsgen's internals.

    python scripts/quality_matrix.py texts --dir texts/       # Debian packages -> plain UTF-8 files
    python scripts/quality_matrix.py run --dir texts/ --out benchmarks/quality/

`run` keeps every calibration and perplexity report under --out/raw and reuses them when run again
(delete them to start over); it writes --out/matrix_<tag>.json and --out/matrix_<tag>.md.

A calibration named mix_no_<E> is the other three texts interleaved (mix_chunks, written to --dir
when missing) and is scored on E only: the leave-one-out test of a mixed calibration text;
mix_<a>_<b> is a and b interleaved.
`--compare matrix_small.json` adds, per evaluation text, the single-text calibrations of that file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from catsgen.text_sample import MIX_TURN_TOKENS  # the turn calibrate interleaves --text files in

ROOT = Path(__file__).resolve().parent.parent
# the catsgen command of the running Python's environment (a venv's bin/ need not be on PATH)
CATSGEN = str(Path(sys.executable).with_name("catsgen")) if Path(sys.executable).with_name("catsgen").exists() else "catsgen"
BUILTIN = "pydoc"  # the built-in calibration sample: no --text
# name -> (Debian package, file inside it, start of the first line kept, most lines kept or None)
DEBIAN_TEXTS = {
    "devil": ("dict-devil", "usr/share/dictd/devil.dict.dz", "                              PREFACE", None),
    "webster": ("dict-gcide", "usr/share/dictd/gcide.dict.dz", "A \\A\\ (named", 20000),
    "policy": ("debian-policy", "usr/share/doc/debian-policy/policy.txt.gz", "1. About this manual", None),
}
TEXTS = (BUILTIN, *DEBIAN_TEXTS)
LABELS = {BUILTIN: "Python docs (`pydoc_data.topics`)", "devil": "Devil's Dictionary (`dict-devil`)",
          "webster": "Webster 1913 (`dict-gcide`)", "policy": "Debian Policy (`debian-policy`)"}


def extract_texts(directory: Path) -> None:
    """apt-get download each package, unpack it, keep the text from its first real line (dictd's
    header and the manual's table of contents are dropped) as UTF-8."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (package, member, start, max_lines) in DEBIAN_TEXTS.items():
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True)
            deb = next(Path(tmp).glob(f"{package}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), "root"], cwd=tmp, check=True)
            # bytes, split on newlines only (like sed/head): the dictionary is not UTF-8 past the part kept
            lines = gzip.open(Path(tmp, "root", member)).read().split(b"\n")
            first = next(i for i, line in enumerate(lines) if line.startswith(start.encode()))
            kept = b"".join(line + b"\n" for line in lines[first:first + max_lines if max_lines else None])
            kept = kept[:-1] if not max_lines and not lines[-1] else kept  # the file's own last newline
            Path(directory, f"{name}.txt").write_text(kept.decode("utf-8"), encoding="utf-8")
            print(f"{name}.txt: {len(kept)} bytes from {deb.name}", file=sys.stderr)


def parts(name: str) -> tuple[str, ...]:
    """The texts a calibration is made of: mix_no_<t> is every text but t, mix_<a>_<b>.. those texts."""
    if name.startswith("mix_no_"):
        return tuple(t for t in TEXTS if t != name.removeprefix("mix_no_"))
    return tuple(name.removeprefix("mix_").split("_")) if name.startswith("mix_") else (name,)


def calibration_name(name: str) -> str:
    """argparse type: a text, or a mix of two or more texts."""
    names = parts(name)
    if any(t not in TEXTS for t in names) or (name.startswith("mix_") and len(names) < 2) \
            or (name.startswith("mix_no_") and name.removeprefix("mix_no_") not in TEXTS):
        raise argparse.ArgumentTypeError(f"{name}: not one of {', '.join(TEXTS)}, mix_no_<text> or mix_<text>_<text>..")
    return name


def read_text(directory: Path, name: str) -> str:
    if name == BUILTIN:
        from catsgen.text_sample import builtin_text
        return builtin_text()
    return Path(directory, f"{name}.txt").read_text(encoding="utf-8")


def mix_chunks(texts: list[str], count, chunk_tokens: int, total_tokens: int) -> list[tuple[int, str]]:
    """(text index, chunk) round-robin over the texts, each chunk cut at a line end once its text
    has given round x chunk_tokens tokens in all (count(line) tokens per line), so every text's
    share of any prefix is within one chunk of equal; until total_tokens, or a text runs out."""
    lines = [t.splitlines(keepends=True) for t in texts]
    taken, given, chunks, rounds = [0] * len(texts), [0] * len(texts), [], 0
    while sum(given) < total_tokens:
        rounds += 1
        for i, text_lines in enumerate(lines):
            chunk = []
            while given[i] < rounds * chunk_tokens and taken[i] < len(text_lines):
                chunk.append(text_lines[taken[i]])
                given[i] += count(chunk[-1])
                taken[i] += 1
            if not chunk:
                return chunks
            chunks.append((i, "".join(chunk).rstrip("\n") + "\n\n"))  # a blank line between chunks
    return chunks


def prefix_shares(chunks: list[tuple[int, str]], count, n_texts: int, tokens: int) -> list[float]:
    """Each text's share of the first `tokens` tokens of the joined chunks."""
    got, total = [0] * n_texts, 0
    for i, chunk in chunks:
        n = min(count(chunk), tokens - total)
        got[i], total = got[i] + n, total + n
        if total >= tokens:
            break
    return [g / max(total, 1) for g in got]


def ensure_mix(args, name: str) -> None:
    path = Path(args.dir, f"{name}.txt")
    if path.exists():
        return
    from catsgen.default_model import default_checkpoint
    from catsgen.tokenizer import Tokenizer
    tokenizer = Tokenizer(default_checkpoint())
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    names = parts(name)
    chunks = mix_chunks([read_text(args.dir, t) for t in names], count, args.mix_chunk_tokens, 2 * args.tokens)
    path.write_text("".join(c for _, c in chunks), encoding="utf-8")
    shares = {n: prefix_shares(chunks, count, len(names), n) for n in (args.fisher_tokens, args.tokens)}
    print(f"{path}: {' + '.join(names)} in chunks of {args.mix_chunk_tokens} tokens; shares of the first "
          + "; ".join(f"{n} tokens " + " / ".join(f"{x:.3f}" for x in sh) for n, sh in shares.items()),
          file=sys.stderr)


def in_sample(cal: str, ev: str) -> bool:
    return ev in parts(cal)


def text_args(directory: Path, name: str) -> list[str]:
    return [] if name == BUILTIN else ["--text", str(directory / f"{name}.txt")]


def device_args(args) -> list[str]:
    return (["--device", args.device] if args.device else []) + (["--dtype", args.dtype] if args.dtype else [])


def run_json(command: list[str], path: Path) -> dict:
    """Run a catsgen command printing JSON, keep its report at path (reused if already there)."""
    if path.exists():
        return json.loads(path.read_text())
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT).stdout
    report = json.loads(out)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
    return report


def calibrate(args, cal: str) -> Path:
    thresholds = args.out / "raw" / f"thresholds_{args.tag}_{cal}.json"
    if not thresholds.exists():
        if len(parts(cal)) > 1:
            ensure_mix(args, cal)
        command = [sys.executable, "calibrate.py", *text_args(args.dir, cal), "--tokens", str(args.tokens),
                   "--fisher-tokens", str(args.fisher_tokens if "fisher" in args.allocation else 0),
                   "--allocation-tokens", str(args.allocation_tokens if "greedy" in args.allocation else 0),
                   "--out", str(thresholds), *device_args(args), *args.calibrate_arg]
        print("+ " + " ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True, cwd=ROOT, stdout=sys.stderr)
    return thresholds


def score(args, thresholds: Path, ev: str, allocations: list[str], sparsities: list[float], name: str) -> dict:
    command = [CATSGEN, "perplexity", "--json", "--thresholds", str(thresholds), *text_args(args.dir, ev),
               "--max-tokens", str(args.score_tokens), "--seq-len", str(args.seq_len),
               "--sparsity", *[f"{s:.4f}" for s in sparsities], "--allocation", *allocations, *device_args(args)]
    return run_json(command, args.out / "raw" / name)


def cell(args, cal: str, ev: str) -> dict:
    """One (calibration, evaluation) pair: dense, and per S each method matched to uniform's actual."""
    thresholds = calibrate(args, cal)
    base = f"{args.tag}_{cal}_{ev}"
    # the first report's name says which S it holds when they are not the default three
    suffix = "" if args.sparsity == [0.3, 0.5, 0.7] else "_s" + "_".join(f"{s:.1f}" for s in args.sparsity)
    first = score(args, thresholds, ev, args.allocation, args.sparsity, f"ppl_{base}{suffix}.json")
    rows = first["rows"]
    dense = next(r["perplexity"] for r in rows if r["allocation"] == "dense")
    found = {(r["allocation"], round(r["sparsity"], 4)): r for r in rows if r["allocation"] != "dense"}
    result = {"calibration": cal, "evaluation": ev, "dense": dense, "tokens": rows[0]["tokens"], "levels": {}}
    for s in args.sparsity:
        uniform = found[("uniform", round(s, 4))]
        level = {"uniform": pick(uniform)}
        for method in [a for a in args.allocation if a != "uniform"]:
            level[method] = pick(match(args, thresholds, ev, method, s, uniform["actual_sparsity"], found, base))
        result["levels"][f"{s:.1f}"] = level
    if args.reference and not in_sample(args.reference, ev) and args.reference != cal:
        result["reference"] = reference(args, ev, {s: found[("uniform", round(s, 4))]["actual_sparsity"]
                                                   for s in args.sparsity}, suffix)
    return result


def reference(args, ev: str, targets: dict, suffix: str) -> dict:
    """The --reference calibration on ev, every method (uniform too) matched to the cell's uniform
    actual sparsity: the two calibrations compared at the same bytes read, in absolute perplexity."""
    thresholds = calibrate(args, args.reference)
    base = f"{args.tag}_{args.reference}_{ev}"
    rows = score(args, thresholds, ev, args.allocation, args.sparsity, f"ppl_{base}{suffix}.json")["rows"]
    found = {(r["allocation"], round(r["sparsity"], 4)): r for r in rows if r["allocation"] != "dense"}
    levels = {}
    for s, target in targets.items():
        levels[f"{s:.1f}"] = {m: pick(match(args, thresholds, ev, m, s, target, found, base)) for m in args.allocation}
    return {"calibration": args.reference, "levels": levels}


def match(args, thresholds, ev, method, s, target, found, base) -> dict:
    """The method's row whose actual sparsity is within --match of target: secant steps on the
    requested sparsity (actual moves almost one for one with it)."""
    tried = [found[(method, round(s, 4))]]
    for step in range(args.match_steps):
        best = min(tried, key=lambda r: abs(r["actual_sparsity"] - target))
        if abs(best["actual_sparsity"] - target) <= args.match:
            return best
        if len(tried) >= 2:
            a, b = sorted(tried, key=lambda r: abs(r["actual_sparsity"] - target))[:2]
            slope = (b["actual_sparsity"] - a["actual_sparsity"]) / (b["sparsity"] - a["sparsity"] or 1e-9)
            slope = min(max(slope, 0.5), 1.5)
        else:
            slope = 1.0
        request = round(best["sparsity"] + (target - best["actual_sparsity"]) / slope, 4)
        report = score(args, thresholds, ev, [method], [request], f"ppl_{base}_{method}_{request:.4f}.json")
        tried.append(next(r for r in report["rows"] if r["allocation"] == method))
    best = min(tried, key=lambda r: abs(r["actual_sparsity"] - target))
    return best  # not matched: pick() records it and the summary flags it


def pick(row: dict) -> dict:
    return {"requested": row["sparsity"], "actual": row["actual_sparsity"], "perplexity": row["perplexity"]}


def removed(level: dict, dense: float, method: str) -> float:
    """Share of uniform's perplexity increase over dense that the method removes, in %."""
    u = level["uniform"]["perplexity"]
    return 100 * (u - level[method]["perplexity"]) / (u - dense)


def summary(cells: list[dict], methods: list[str], sparsities: list[float], tolerance: float) -> list[dict]:
    rows = []
    for s in sparsities:
        for method in methods:
            off = [(c, removed(c["levels"][f"{s:.1f}"], c["dense"], method)) for c in cells
                   if not in_sample(c["calibration"], c["evaluation"])]
            worst_cell, worst = min(off, key=lambda x: x[1])
            mismatched = sum(abs(c["levels"][f"{s:.1f}"][method]["actual"] - c["levels"][f"{s:.1f}"]["uniform"]["actual"])
                             > tolerance + 1e-12 for c in cells)
            rows.append({"sparsity": s, "method": method, "mean_removed": sum(r for _, r in off) / len(off),
                         "worst_removed": worst, "worst_pair": [worst_cell["calibration"], worst_cell["evaluation"]],
                         "best_removed": max(r for _, r in off), "pairs_worse_than_uniform": sum(r < 0 for _, r in off),
                         "off_diagonal_pairs": len(off), "unmatched_cells": mismatched})
    return rows


def markdown(result: dict) -> str:
    methods = [m for m in result["allocations"] if m != "uniform"]
    lines = ["| S | method | mean removed | worst pair (calibration -> evaluation) | best | pairs worse than uniform "
             f"| cells with actual sparsity off uniform's by > {result['settings']['match']} |",
             "|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        cal, ev = r["worst_pair"]
        lines.append(f"| {r['sparsity']:.1f} | {r['method']} | {r['mean_removed']:.0f}% | {r['worst_removed']:.0f}% "
                     f"({cal} -> {ev}) | {r['best_removed']:.0f}% | {r['pairs_worse_than_uniform']} of "
                     f"{r['off_diagonal_pairs']} | {r['unmatched_cells']} |")
    lines += ["", "| calibration -> evaluation | dense | S | uniform (actual) | "
              + " | ".join(f"{m} (actual, requested) | {m} removed" for m in methods) + " |",
              "|---|---|---|---|" + "---|---|" * len(methods)]
    for c in result["cells"]:
        mark = " (in-sample)" if in_sample(c["calibration"], c["evaluation"]) else ""
        for s, level in c["levels"].items():
            u = level["uniform"]
            cols = [f"{level[m]['perplexity']:.3f} ({level[m]['actual']:.3f}, {level[m]['requested']:.3f}) | "
                    f"{removed(level, c['dense'], m):.0f}%" for m in methods]
            lines.append(f"| {c['calibration']} -> {c['evaluation']}{mark} | {c['dense']:.3f} | {s} | "
                         f"{u['perplexity']:.3f} ({u['actual']:.3f}) | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def comparison(result: dict, other: dict) -> list[dict]:
    """Per mix cell, S and method: the share removed by the mix, by the --reference calibration
    at the same actual sparsity, and by each single-text calibration of `other` on the same text."""
    rows = []
    for c in (c for c in result["cells"] if len(parts(c["calibration"])) > 1):
        singles = [o for o in other["cells"] if o["evaluation"] == c["evaluation"]
                   and not in_sample(o["calibration"], o["evaluation"])]
        for s, level in c["levels"].items():
            for method in [m for m in level if m != "uniform"]:
                row = {"calibration": c["calibration"], "evaluation": c["evaluation"], "sparsity": float(s),
                       "method": method, "dense": c["dense"], "uniform": level["uniform"], method: level[method],
                       "removed": removed(level, c["dense"], method)}
                ref = c.get("reference", {}).get("levels", {}).get(s)
                if ref:
                    row["reference"] = {"calibration": c["reference"]["calibration"], **ref,
                                        "removed": removed(ref, c["dense"], method)}
                single = {o["calibration"]: removed(o["levels"][s], o["dense"], method)
                          for o in singles if s in o["levels"] and method in o["levels"][s]}
                if single:
                    row["single"] = single
                rows.append(row)
    return rows


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["| evaluation (not in the mix) | S | dense | mix: uniform (actual) | mix: method (actual) | mix removed "
             "| reference at the mix's uniform actual: uniform | method | removed "
             "| single texts (--compare): removed, mean | worst | each |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, ref, single = r["method"], r.get("reference"), r.get("single", {})
        ref_cols = (f"{ref['calibration']}: {ref['uniform']['perplexity']:.3f} ({ref['uniform']['actual']:.3f}) | "
                    f"{ref[m]['perplexity']:.3f} ({ref[m]['actual']:.3f}) | {ref['removed']:.0f}%") if ref else "- | - | -"
        worst = min(single, key=single.get) if single else None
        single_cols = (f"{sum(single.values()) / len(single):.0f}% | {single[worst]:.0f}% ({worst}) | "
                       + ", ".join(f"{k} {v:.0f}%" for k, v in single.items())) if single else "- | - | -"
        lines.append(f"| {r['evaluation']} | {r['sparsity']:.1f} | {r['dense']:.3f} | {r['uniform']['perplexity']:.3f} "
                     f"({r['uniform']['actual']:.3f}) | {m} {r[m]['perplexity']:.3f} ({r[m]['actual']:.3f}) | "
                     f"{r['removed']:.0f}% | {ref_cols} | {single_cols} |")
    return "\n".join(lines) + "\n"


def run(args) -> None:
    (args.out / "raw").mkdir(parents=True, exist_ok=True)
    cells = [cell(args, cal, ev) for cal in args.calibration for ev in args.evaluation
             if not in_sample(cal, ev) or args.diagonal]
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
              "texts": {t: LABELS[t] for t in TEXTS}, "allocations": args.allocation, "cells": cells}
    result["summary"] = summary(cells, [m for m in args.allocation if m != "uniform"], args.sparsity, args.match)
    md = markdown(result)
    if args.compare or args.reference:
        other = json.loads(args.compare.read_text()) if args.compare else {"cells": []}
        result["comparison"] = comparison(result, other)
        md = comparison_markdown(result["comparison"]) + "\n" + md
    for name, text in ((f"matrix_{args.tag}.json", json.dumps(result, indent=1)), (f"matrix_{args.tag}.md", md)):
        tmp = args.out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out / name)
    print(md)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(required=True)
    texts = sub.add_parser("texts", help="extract the Debian texts into --dir")
    texts.add_argument("--dir", type=Path, required=True)
    texts.set_defaults(func=lambda a: extract_texts(a.dir))
    r = sub.add_parser("run", help="calibrate and score the matrix")
    r.add_argument("--dir", type=Path, required=True, help="folder of the extracted texts")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--tag", default="default", help="names this configuration's files")
    r.add_argument("--calibration", nargs="+", default=list(TEXTS), type=calibration_name,
                   help="texts, or mixes: mix_no_<text> (the other three, interleaved; scored on <text> only), "
                        "mix_<text>_<text>.. (those texts, interleaved)")
    r.add_argument("--reference", choices=TEXTS, help="also score this calibration on every evaluation text "
                   "outside it, each method matched to the cell's uniform actual sparsity")
    r.add_argument("--compare", type=Path, help="a matrix_<tag>.json of single-text calibrations to compare with")
    r.add_argument("--mix-chunk-tokens", type=int, default=MIX_TURN_TOKENS, help="tokens per chunk of a mix")
    r.add_argument("--evaluation", nargs="+", default=list(TEXTS), choices=TEXTS)
    r.add_argument("--allocation", nargs="+", default=["uniform", "greedy", "fisher"])
    r.add_argument("--sparsity", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    r.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    r.add_argument("--fisher-tokens", type=int, default=4096)
    r.add_argument("--allocation-tokens", type=int, default=128, help="greedy's KL curves (120 forwards of these)")
    r.add_argument("--diagonal", action="store_true", help="also score each text with its own thresholds (in-sample)")
    r.add_argument("--calibrate-arg", action="append", default=[], help="extra calibrate.py argument (repeat)")
    r.add_argument("--score-tokens", type=int, default=2048, help="tokens scored per evaluation text")
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--device", help="passed to calibrate and perplexity (cuda: minutes instead of hours)")
    r.add_argument("--dtype", help="passed to calibrate and perplexity (default float32 on cpu, bfloat16 on cuda)")
    r.add_argument("--match", type=float, default=0.005, help="largest actual-sparsity gap to uniform")
    r.add_argument("--match-steps", type=int, default=3, help="most re-scorings per method and cell")
    r.set_defaults(func=run)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
