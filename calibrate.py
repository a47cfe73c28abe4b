"""Entry script: `python calibrate.py --help` (same as `catsgen calibrate`)."""

from catsgen.cli import main

if __name__ == "__main__":
    main(prog_name="calibrate.py", command="calibrate")
