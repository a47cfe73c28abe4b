"""What each decode kernel compiles to for an H100/H200 (sm_90), without a GPU: registers, spills,
the programs an SM its registers and warps allow and the waves its grid takes on 132 SMs (the
sparse launches' grids have a program for every row; at sparsity s about 1 - s of them work), and
the instruction mix of its main loop, per launch that tests/hopper_compile.py records. A
prediction tool (notes/kernels.md v9, v10): a change that cuts a loop's instructions or a kernel's
registers can be seen before any device time is spent on it.
    python3 scripts/sass_report.py [--model] [name-substring ...]     (e.g. _gate_kernel int8)
    python3 scripts/sass_report.py [--bf16] --try FIELD=INT[,FIELD=INT...] ...
--model: the MLP at Llama-2-7B's shape (4096 x 11008, the tiles dividing it as in the model);
without it the test's small shape, where some loads keep masks the model's do not. --try: the
one-token MLP launches (norm folded in, Llama-2-7B's shape) with the model's int8 tiles (--bf16:
its bf16 tiles) changed as scripts/gpu_sparse.py --try changes them ("model": unchanged).
Uses Triton's bundled cuobjdump; run without TRITON_INTERPRET."""
import collections
import glob
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import hopper_compile as hc  # noqa: E402

CUOBJDUMP = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))[0]


def loops(sass: str):
    """(instructions, {opcode: count}) of each backward branch's loop body."""
    code = [(int(a, 16), ins) for a, ins in re.findall(r"/\*([0-9a-f]{4})\*/\s+(.*?);", sass)]
    for addr, ins in code:
        target = re.search(r"BRA (0x[0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < addr:
            body = [i for a, i in code if int(target.group(1), 16) <= a <= addr]
            yield len(body), collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0].split(".")[0] for i in body)


SMS = 132  # H100 SXM and H200


def programs_per_sm(registers: int, warps: int) -> int:
    """Resident programs an SM by registers (allocated per warp in units of 256, 64K an SM) and by
    warps (64) and programs (32) an SM; shared memory is not counted."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(65536 // (per_warp * warps), 64 // warps, 32)


def report(label, compiled, grid: tuple, warps: int):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)", usage)
    per_sm, programs = programs_per_sm(int(regs.group(1)), warps), grid[0] * (grid[1] if len(grid) > 1 else 1)
    # a register cap's spills land on the stack (LDL / STL in the loop), not in LOCAL
    print(f"{label}: {regs.group(1)} registers, {regs.group(3)} bytes spilled, {regs.group(2)} of stack; {warps} "
          f"warps, {per_sm} programs an SM; grid {programs}: {programs / (per_sm * SMS):.2f} waves")
    for n, ops in loops(sass):
        local = ops["LDL"] + ops["STL"]
        print(f"    loop of {n} instructions: " + ", ".join(f"{op} {k}" for op, k in ops.most_common(8)) +
              (f"; {local} LDL / STL" if local else ""))


def variants(texts, int8: bool, D=4096, F=11008):
    """Each Blocks variant's one-token MLP launches, compiled and reported."""
    from gpu_sparse import tile_changes, tile_variants
    hc.record_kernels()
    x, norm, weights, scales = hc.mlp_inputs(1, D, F, int8)
    for label, blocks in tile_variants(hc.mlp_tiles.pick_blocks(1, int8=int8), [tile_changes(t) for t in texts]).items():
        hc.launches.clear()
        hc.cm.cats_mlp_triton(x, *weights, torch.rand(F), norm=norm, blocks=blocks, **scales)
        print(f"== {label}")
        for name, kernel, named, options, grid in hc.launches:
            report(name, hc.compile_for_hopper(kernel, named, options), grid, options.get("num_warps", 4))


def main():
    if "--try" in sys.argv:
        return variants(sys.argv[sys.argv.index("--try") + 1:], int8="--bf16" not in sys.argv)
    wanted = [a for a in sys.argv[1:] if a != "--model"]
    hc.record_all(*((4096, 11008) if "--model" in sys.argv else ()))
    for label, kernel, named, options, grid in hc.launches:
        weights = next((v.dtype for k, v in named.items() if k.startswith("w") and hasattr(v, "dtype")), None)
        tag = f"{label} {str(weights).removeprefix('torch.')} " + " ".join(
            f"{k}={named[k]}" for k in ("B", "FMA", "NORM") if k in named) + \
            (f" maxnreg={options['maxnreg']}" if "maxnreg" in options else "")
        if all(w in tag for w in wanted):
            report(tag, hc.compile_for_hopper(kernel, named, options), grid, options.get("num_warps", 4))


if __name__ == "__main__":
    main()
