"""bench.py with the one-token CATS MLP in three launches (Blocks.overlap off), for an A/B against
the default in the same device call: `python3 scripts/gpu_three_launches.py [bench.py options]`."""
import dataclasses
import importlib
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
cm = importlib.import_module("catsgen.kernels.cats_mlp")  # pick_blocks reads these at each call
cm.FLOAT_B1_BLOCKS = dataclasses.replace(cm.FLOAT_B1_BLOCKS, overlap=False)
cm.INT8_B1_BLOCKS = dataclasses.replace(cm.INT8_B1_BLOCKS, overlap=False)
sys.argv = [str(ROOT / "bench.py")] + sys.argv[1:]
runpy.run_path(str(ROOT / "bench.py"), run_name="__main__")
