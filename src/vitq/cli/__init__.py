"""The ``vitq`` command line: one module per subcommand, each with ``add_command(subparsers)``.

Bad input ends with one line on stderr naming the input and what was expected, exit status 2, and no partial
output: results are written into a temporary folder beside ``--out`` and renamed into place at the end. All
argparse code of vitq lives in this package; the library modules it calls carry none.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from vitq.errors import VitqError

# subcommands after quantize (which needs argv to show one method's options): each defines add_command(subparsers)
COMMAND_MODULES: tuple[str, ...] = ("vitq.cli.evaluate", "vitq.cli.demo", "vitq.cli.methods",
                                     "vitq.cli.landscape", "vitq.cli.allocation", "vitq.cli.recipes",
                                     "vitq.cli.models", "vitq.cli.export", "vitq.cli.sweep",
                                     "vitq.cli.results")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    from vitq._version import __version__
    from vitq.cli import quantize

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="vitq", description="Post-training quantization of vision transformers.")
    p.add_argument("--version", action="version", version=f"vitq {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    quantize.add_command(sub, argv)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from vitq.cli.validate import set_threads

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="vitq: %(message)s", stream=sys.stderr, force=True)
    try:
        if hasattr(args, "threads"):
            args.threads = set_threads(args.threads)
        args.argv = argv
        return int(args.func(args) or 0)
    except VitqError as e:
        print(f"vitq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitq: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a permission changed during the run, ...: one line, not a traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"vitq: error: {where}{e.strerror or e} (expected a readable input and a writable output)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
