"""The ``halfbyte`` command (``python -m halfbyte``). Each subcommand is a small module with ``add_args``/``run``."""

import argparse
import sys

from . import demo

COMMANDS = {"demo": demo}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="halfbyte", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, mod in COMMANDS.items():
        mod.add_args(sub.add_parser(name, help=mod.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
