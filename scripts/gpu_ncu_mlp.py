"""Runs the one-token int8 launches once each for Nsight Compute to profile (no timing here):
the int8 CATS MLP's gate, up and down launches at s = 0.5 (the model's tiles) and the dense int8
GEMV of W_gate (the same bytes as the gate launch) for comparison.
    ncu --clock-control none --kernel-name regex:"_gate|_up|_down|_gemv" python3 scripts/gpu_ncu_mlp.py
"""
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from catsgen.kernels import gemv, prepare_workspaces  # noqa: E402

gs = importlib.import_module("gpu_sparse")


def main():
    prepare_workspaces("cuda", 1, 1)
    case = gs.make_case("int8")
    cfg = gs.mlp_tiles.pick_blocks(1, int8=True)
    for _ in range(2):
        gs.call(case, cfg, 0.5, 0)
    (qg, _, _), (sg, _, _) = case[0][0]
    gemv(case[1], qg, sg)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
