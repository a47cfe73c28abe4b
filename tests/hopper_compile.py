"""Compile every Triton decode kernel for an H100/H200 (sm_90) without a GPU: what Triton's
interpreter (the CPU tests) accepts but the real compiler may refuse. Run as a script by
tests/test_hopper_compile.py, without TRITON_INTERPRET (this process never launches a kernel).

Each kernel is launched by its own host code on small CPU tensors with `run` replaced by a
recorder; the recorded arguments give the signature and constexprs that triton.compile needs.
DOT_F32 is set as on the GPU for 16-bit inputs (False): on CPU tensors the host code picks the
interpreter's workaround."""
import dataclasses
import importlib
import sys

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

da = importlib.import_module("catsgen.kernels.decode_attention")
cm = importlib.import_module("catsgen.kernels.cats_mlp")
mlp_tiles = importlib.import_module("catsgen.kernels.mlp_tiles")
gm = importlib.import_module("catsgen.kernels.gemv")
HOPPER = GPUTarget("cuda", 90, 32)
launches = []  # (label, kernel, args by name, options, grid)


def record(kernel, label):
    def run(*args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
        options = {k: v for k, v in options.items() if v is not None}
        named = dict(zip(kernel.arg_names, args)) | kwargs
        if "DOT_F32" in named and any(getattr(a, "dtype", None) in (torch.bfloat16, torch.float16) for a in args):
            named["DOT_F32"] = False
        launches.append((f"{label} {kernel.fn.__name__}", kernel, named, options, grid))
    kernel.run = run


def compile_for_hopper(kernel, named, options):
    """Specialized as Triton's JIT specializes a launch: an int equal to 1 becomes a constant, and
    ints and pointers divisible by 16 say so (tt.divisibility), which decides the loads' width."""
    constexpr = set(kernel.constexprs)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = named[name]
        kind, spec = ("constexpr", None) if i in constexpr else \
            native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            constexprs[(i,)] = value
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
        signature[name] = kind
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=HOPPER, options=options)


def mlp_inputs(B: int, D: int, F: int, int8: bool):
    """Random CATS MLP inputs for a recorded launch: x [B, D] bf16, the block's norm (weight, eps),
    the three weights [F, D] (bf16, or int8) and the keyword arguments that go with them (int8: the
    scales; float: none)."""
    bf16 = dict(dtype=torch.bfloat16)
    x, norm = torch.randn(B, D, **bf16), (torch.rand(D, **bf16), 1e-5)
    if int8:
        weights = [torch.randint(-127, 128, (F, D), dtype=torch.int8) for _ in range(3)]
        return x, norm, weights, dict(scales=(torch.rand(F), torch.rand(F), torch.rand(D)))
    return x, norm, [torch.randn(F, D, **bf16) for _ in range(3)], {}


def launch_all(D=256, F=512):
    """D, F: the MLP's shape (small for the test; scripts/sass_report.py --model takes Llama-2-7B's,
    whose tiles divide it as the model's do)."""
    bf16 = dict(dtype=torch.bfloat16)
    for label, Hkv in (("MHA", 4), ("GQA", 1)):
        q, (k, v) = torch.randn(1, 4, 1, 128, **bf16), torch.randn(2, 1, Hkv, 64, 128, **bf16)
        da.decode_attention_triton(q, k, v, torch.tensor([9]), 0)
        qkv = torch.randn(1, 1, (4 + 2 * Hkv) * 128, **bf16)
        da.decode_attention_rope_triton(qkv, torch.randn(64, 128), torch.randn(64, 128), torch.stack((k, v)),
                                        torch.tensor([9]), 4, 16)
    for B in (1, 4):
        x, norm, w16, _ = mlp_inputs(B, D, F, int8=False)  # norm: the block's RMSNorm folded in (issue 14)
        cm.cats_mlp_triton(x, *w16, torch.tensor(0.1))
        cm.cats_mlp_triton(x, *w16, torch.tensor(0.1), norm=norm)
        _, _, q8, int8_scales = mlp_inputs(B, D, F, int8=True)
        scales = int8_scales["scales"]
        cm.cats_mlp_triton(x, *q8, torch.rand(F), scales=scales)
        cm.cats_mlp_triton(x, *q8, torch.rand(F), scales=scales, norm=norm)
        if B == 1:  # the model's int8 tiles on bytes (down_words off), and with the gate's cap lower
            for change in (dict(down_words=False), dict(gate_regs=64)):
                blocks = dataclasses.replace(mlp_tiles.INT8_B1_BLOCKS, **change)
                cm.cats_mlp_triton(x, *q8, torch.rand(F), scales=scales, norm=norm, blocks=blocks)
        gm.int8_gemv_triton(x, q8[0], scales[0])
        gm.gemv_triton(x, torch.randn(D, D, **bf16), residual=torch.randn(B, D, **bf16))
        gm.gemv_triton(x, torch.randn(F, D, **bf16), up=(torch.randn(F, D, **bf16), None))  # the dense MLP's gated GEMV
        gm.gemv_triton(x, q8[0], scales[0], up=(q8[1], scales[1]))


def record_kernels():
    """Every decode kernel's launches from now on go to `launches` (nothing runs)."""
    for module, names in ((da, ["_split_kernel"]),
                          (cm, ["_gate_kernel", "_up_kernel", "_down_kernel", "down1_kernel", "down1_words_kernel"]),
                          (gm, ["_gemv_kernel"])):
        for name in names:
            record(getattr(module, name), module.__name__.rsplit(".", 1)[1])


def record_all(D=256, F=512):
    """Every decode kernel's launches by its host code, into `launches`."""
    record_kernels()
    launch_all(D, F)


def main():
    record_all()
    failed = 0
    for label, kernel, named, options, _ in launches:
        try:
            compiled = compile_for_hopper(kernel, named, options)
            print(f"ok {label} ({len(compiled.asm['ptx'].splitlines())} PTX lines)")
        except Exception as e:  # every launch is tried; the exit code says whether all compiled
            failed += 1
            print(f"FAILED {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print(f"{len(launches) - failed} of {len(launches)} launches compiled for sm_90")
    sys.exit(1 if failed or not launches else 0)


if __name__ == "__main__":
    main()
