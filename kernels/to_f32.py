"""How weight tiles become fp32 in registers (kernels/tiles.py and the CATS down launches use it):
float weights through the conversion unit, int8 ones without it (int8_to_f32: exact, two
instructions a weight; int8_to_f32_offset: one instruction a weight plus an offset the caller takes
off once per run of products; int8_words_to_f32_offset: the same on int32 words of four weights).
On the GPU the int8 paths are inline PTX (an XOR, then byte permutes); Triton's interpreter, which
runs no PTX, takes plain paths with the same results (tests/test_int8_kernels.py checks the PTX's
permutes for every value and byte position)."""
import os

import triton
import triton.language as tl


# Triton's interpreter runs no inline PTX (the CPU tests): there the int8 conversions take plain paths
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# The byte permutes of the two int8 conversions: (the register of constant bytes, one selector a
# weight k of four): byte k of t = XOR(w, 0x80808080) into byte 0 under 0x4B (2^23 + b + 128) or
# into byte 1 under 0x47 (2^15 + b + 128). tests/test_int8_kernels.py runs them on every value.
PERMUTES_2_23 = ("0x4B000000", ("0x7650", "0x7651", "0x7652", "0x7653"))
PERMUTES_2_15 = ("0x47000000", ("0x7404", "0x7414", "0x7424", "0x7434"))


def _ptx(permutes) -> tl.constexpr:
    """PTX for four int8 weights in a register: one XOR flips their sign bits (b + 128 as unsigned
    bytes), then a byte permute a weight builds its fp32 bits from those bytes and the constant's."""
    constant, selectors = permutes
    prmts = "".join(f"prmt.b32 ${i}, t, k, {sel};" for i, sel in enumerate(selectors))
    return tl.constexpr(f"{{.reg .b32 t, k; xor.b32 t, $4, 0x80808080; mov.b32 k, {constant}; {prmts}}}")


_UNDER_2_23, _UNDER_2_15 = _ptx(PERMUTES_2_23), _ptx(PERMUTES_2_15)


@triton.jit
def _placed_bytes(w, PTX: tl.constexpr):
    return tl.inline_asm_elementwise(PTX, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def int8_to_f32(w):
    """int8 -> fp32, exact, on the integer and FMA pipes instead of the conversion unit (16 per clock
    per SM on Hopper, fewer than the int8 weights HBM delivers): 2^23 has an fp32 ulp of 1, so the
    bits of 2^23 + 128 + b, i.e. 0x4B000080 + b, read as fp32 are that number exactly. On the GPU
    four weights at a time: one XOR flips their sign bits (b + 128 as an unsigned byte), then a
    byte permute per weight places it under the exponent bits 0x4B: two instructions a weight with
    the subtraction, where sign-extending each byte first takes three."""
    if _INTERPRETED:
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        return _placed_bytes(w, _UNDER_2_23) - 8388736.0


# int8_to_f32_offset's offset: the caller takes OFFSET x (its x) off each step's sums
OFFSET = tl.constexpr(32896.0)


@triton.jit
def int8_to_f32_offset(w):
    """int8 b -> fp32 OFFSET + b (OFFSET = 2^15 + 128), exact, one instruction a weight on the
    GPU: one XOR flips four weights' sign bits (b + 128 as an unsigned byte), then a byte permute
    a weight places it in byte 1 under the exponent byte 0x47: 0x4700XX00 read as fp32 is
    2^15 + XX (the fp32 ulp at 2^15 is 2^-8). No subtraction a weight, as a float trick with byte 0
    under 2^23 needs: the caller subtracts OFFSET x once a step for a whole run of weights
    (rows_times_x1) or row group (the CATS down launch). The products carry the offset's rounding,
    ~2^-9 |x| each against |b x| ~ 40 |x|: ~1e-4 relative in fp32 sums, below bf16's rounding.
    The CATS launches use it (fewer instructions a weight measured faster there); the GEMVs, whose
    2-4-row tiles pay for the per-step x sums, keep int8_to_f32 (notes/kernels.md v10)."""
    if _INTERPRETED:  # Triton's interpreter runs no inline PTX (the CPU tests)
        return w.to(tl.float32) + OFFSET
    else:
        return _placed_bytes(w, _UNDER_2_15)


@triton.jit
def int8_words_to_f32_offset(words):
    """int8_to_f32_offset on int32 words, each four int8 weights (byte k: the word's column k, as
    memory holds them): four fp32 tensors OFFSET + b, one a byte position, in words' shape. The same
    XOR and byte permutes; a tile loaded as words stays words in registers (a byte tile carried
    across a loop's iterations is repacked a byte at a time, notes/kernels.md v11)."""
    if _INTERPRETED:
        return (((words << 24) >> 24).to(tl.float32) + OFFSET, ((words << 16) >> 24).to(tl.float32) + OFFSET,
                ((words << 8) >> 24).to(tl.float32) + OFFSET, (words >> 24).to(tl.float32) + OFFSET)
    else:
        return tl.inline_asm_elementwise(_UNDER_2_15, "=r,=r,=r,=r,r", [words], dtype=(tl.float32,) * 4,
                                         is_pure=True, pack=1)


# as_f32's MAGIC: how weights become fp32
PLAIN = tl.constexpr(0)  # .to(fp32): float weights (int8 too, through the conversion unit)
EXACT_INT8 = tl.constexpr(1)  # int8_to_f32
OFFSET_INT8 = tl.constexpr(2)  # int8_to_f32_offset: the caller takes OFFSET x off


@triton.jit
def as_f32(w, MAGIC: tl.constexpr):
    """fp32 weights, converted as MAGIC says (PLAIN, EXACT_INT8, OFFSET_INT8)."""
    if MAGIC == OFFSET_INT8:
        return int8_to_f32_offset(w)
    elif MAGIC == EXACT_INT8:
        return int8_to_f32(w)
    else:
        return w.to(tl.float32)
