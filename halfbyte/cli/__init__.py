"""The ``halfbyte`` command (``python -m halfbyte``): quantize, generate, inspect, bench, demo.

Each subcommand is one module with ``add_args(parser)`` and ``run(args) -> exit status`` that calls halfbyte's
public functions; errors the user can act on are ``CliError``s, reported as one line with a distinct exit status.
"""

import argparse
import sys

from . import _common, bench, demo, generate, inspect, quantize
from ._common import FAILED, INTERRUPTED, NOT_FOUND, CliError

COMMANDS = {"demo": demo, "quantize": quantize, "generate": generate, "inspect": inspect, "bench": bench}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="halfbyte", description="bitsandbytes-compatible 4-bit (NF4/FP4) and 8-bit (LLM.int8()) quantization "
        "of PyTorch models,\nfrom the command line. Run 'halfbyte demo' first (offline, no downloads).",
        epilog=_common.EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"halfbyte {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = _common.common_parent()
    for name, mod in COMMANDS.items():
        summary, _, details = mod.__doc__.strip().partition("\n")
        p = sub.add_parser(name, help=summary, description=(summary + "\n" + details).strip(), parents=[parent],
                           epilog=_common.EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        with _common.output_settings(args):
            return COMMANDS[args.command].run(args)
    except CliError as e:
        if args.verbose:
            raise
        print(f"halfbyte {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"halfbyte {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (FileNotFoundError, NotADirectoryError) as e:  # from the library: a missing file or directory
        if args.verbose:
            raise
        print(f"halfbyte {args.command}: error: {e}", file=sys.stderr)
        return NOT_FOUND
    except (ValueError, OSError) as e:  # from the library: bad checkpoint contents, unreadable files, ...
        if args.verbose:
            raise
        print(f"halfbyte {args.command}: error: {type(e).__name__}: {e} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
