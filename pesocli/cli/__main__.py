"""``python -m pesocli.cli``: the same as the ``peso`` console script."""

from pesocli.cli import main

if __name__ == "__main__":
    main(prog_name="peso")
