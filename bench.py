"""Entry script: `python bench.py --help` (same as `catsgen bench`)."""

from catsgen.cli import main

if __name__ == "__main__":
    main(prog_name="bench.py", command="bench")
