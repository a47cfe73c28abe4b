#!/usr/bin/env bash
# A virtual environment with the device's Triton (3.6.0, the GPU image's) beside this machine's CPU
# torch, to read what the device compiles without a GPU: Triton 3.9 (here) and 3.6 lay out some
# tiles differently (notes/kernels.md v14).
# Usage: bash scripts/device_triton_venv.sh [DIR]      (default /tmp/triton36), then e.g.
#   env -u TRITON_INTERPRET DIR/bin/python scripts/sass_report.py --model B=1
#   env -u TRITON_INTERPRET DIR/bin/python scripts/sass_report.py --try model gate_regs=80
set -euo pipefail
DIR=${1:-/tmp/triton36}
cd "$(dirname "$0")/.."
python3 -m venv "$DIR"
"$DIR/bin/pip" install -q torch==2.13.0 triton==3.6.0
"$DIR/bin/pip" install -q --no-build-isolation -e .  # triton 3.6 meets the project's range: kept
"$DIR/bin/python" -c "import triton; assert triton.__version__ == '3.6.0', triton.__version__; print('triton', triton.__version__, 'in $DIR')"
