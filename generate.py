"""Entry script: `python generate.py --help` (same as `catsgen generate`)."""

from catsgen.cli import main

if __name__ == "__main__":
    main(prog_name="generate.py", command="generate")
