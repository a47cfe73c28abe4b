"""bench.py with one of the decode step's devices turned off, for an A/B against the default in the
same device call:
    python3 scripts/gpu_without.py overlap [bench.py options]   # CATS up and down as two launches
    python3 scripts/gpu_without.py prefetch [bench.py options]  # no W_o prefetch during attention
"""
import dataclasses
import importlib
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
what = sys.argv[1]
if what == "overlap":
    cm = importlib.import_module("catsgen.kernels.cats_mlp")  # pick_blocks reads these at each call
    cm.FLOAT_B1_BLOCKS = dataclasses.replace(cm.FLOAT_B1_BLOCKS, overlap=False)
    cm.INT8_B1_BLOCKS = dataclasses.replace(cm.INT8_B1_BLOCKS, overlap=False)
elif what == "prefetch":
    from catsgen.model import Attention
    Attention.prefetch_wo = 0.0
else:
    sys.exit(f"gpu_without.py: unknown device {what!r} (overlap, prefetch)")
sys.argv = [str(ROOT / "bench.py")] + sys.argv[2:]
runpy.run_path(str(ROOT / "bench.py"), run_name="__main__")
