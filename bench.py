"""Entry script: `python bench.py --help` (same as `catsgen bench`); `python bench.py kernels`
times the MLP kernels alone (same as `catsgen bench-kernels`)."""

import sys

from catsgen.cli import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["kernels"]:
        main(argv=sys.argv[2:], prog_name="bench.py kernels", command="bench-kernels")
    else:
        main(prog_name="bench.py", command="bench")
