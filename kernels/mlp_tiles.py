"""The CATS MLP's tiles (kernels/cats_mlp.py): the Blocks fields every launch takes, the tables
tuned on an H200 for one token and for several (int8 and float weights), and the choice between
them. Kept apart from the kernels because the tables change with each sweep and the kernels do not;
how each table was measured: notes/kernels.md.
"""
from dataclasses import dataclass

__all__ = ["Blocks", "INT8_BLOCKS", "INT8_B1_BLOCKS", "FLOAT_B1_BLOCKS", "pick_blocks", "down_words_fit"]


@dataclass(frozen=True)
class Blocks:
    """Tile sizes (rows x columns per step), steps per program, warps, pipeline depth.
    fma_at_b1 (B = 1 only): gate and up multiply-add in fp32 instead of a tl.dot with x padded to
    16 tokens, and the down launch is down1.down1_kernel, whose down_steps are row steps (a program:
    down_r x down_steps list entries, down_d columns); sub: the gate and up FMA steps sum runs of
    sub adjacent columns first (tiles.rows_times_x1; 0 = a full accumulator). down_fold:
    down1_kernel's FOLD; down_warps: its warps (0: warps, as up). down_words (int8, fma_at_b1, where
    down_d divides D and D is a multiple of 16; else ignored): the down launch is
    down1.down1_words_kernel, W_down^T's rows loaded as int32 words a step ahead. gate_regs: a cap
    on the gate launch's registers a thread (Triton's maxnreg; 0 = the compiler's choice), where one
    more program an SM fits all of its programs in one wave."""
    gate_f: int = 64
    gate_d: int = 128
    gate_warps: int = 4
    gate_stages: int = 4
    up_r: int = 64
    up_d: int = 128
    up_steps: int = 8
    down_r: int = 64
    down_d: int = 128
    down_steps: int = 2
    warps: int = 4
    stages: int = 3
    fma_at_b1: bool = False
    sub: int = 0
    down_fold: int = 0
    down_warps: int = 0
    down_words: bool = False
    gate_regs: int = 0


# The H200 sweeps' best for 4096x11008 (scripts/gpu_int8.py --sweep, notes/kernels.md int8 v2):
# B = 1 on the FMA units (few rows, long int8 steps); B > 1 through tl.dot (16-row tiles at least).
INT8_BLOCKS = Blocks(gate_f=32, gate_d=128, gate_warps=4, gate_stages=4, up_r=32, up_d=256, up_steps=4,
                     down_r=64, down_d=128, down_steps=2, warps=4, stages=4)
# the down launch: 32 rows x 128 columns x 4 steps on one warp, accumulator [4, 128] (one layout
# period of int8 rows with one warp): twice the programs of 64-row tiles on 2 warps, which left
# most warp slots idle (notes/kernels.md v11); its rows as int32 words, a step ahead (down_words).
# The gate capped at 80 registers: 6 programs an SM, all 688 in one wave (91 uncapped under Triton
# 3.6). Both measured in the model on an H200, one process (notes/kernels.md v15).
INT8_B1_BLOCKS = Blocks(gate_f=16, gate_d=512, gate_warps=4, gate_stages=2, up_r=8, up_d=512, up_steps=4,
                        down_r=32, down_d=128, down_steps=4, warps=2, stages=1, fma_at_b1=True, sub=16,
                        down_fold=4, down_warps=1, down_words=True, gate_regs=80)
# Float weights, one token: the FMA launches with runs of 8 (scripts/gpu_sparse.py --sweep, session 9);
# the down launch on one warp, 32 rows x 2 steps (notes/kernels.md v12)
FLOAT_B1_BLOCKS = Blocks(gate_f=16, gate_d=256, gate_warps=4, gate_stages=3, up_r=8, up_d=1024, up_steps=2,
                         down_r=32, down_d=128, down_steps=2, warps=2, stages=2, fma_at_b1=True, sub=8,
                         down_fold=4, down_warps=1)


def pick_blocks(B: int, int8: bool = False) -> Blocks:
    """One token: the FMA launches (no padding to 16 tokens), int8 and float each their own tiles.
    Several: through tl.dot with tokens padded to 16; float weights share one table for every B
    (how each was tuned: notes/kernels.md)."""
    if B == 1:
        return INT8_B1_BLOCKS if int8 else FLOAT_B1_BLOCKS
    return INT8_BLOCKS if int8 else Blocks()


def down_words_fit(cfg: Blocks, D: int) -> bool:
    """Whether the one-token int8 down launch runs on words (cfg.down_words where whole words and
    whole column tiles fit D; elsewhere the byte tiles run)."""
    return bool(cfg.down_words) and D % 16 == 0 and D % cfg.down_d == 0  # (bool: --try gives 0 or 1)
