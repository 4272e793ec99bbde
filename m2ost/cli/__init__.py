"""The ``m2ost`` command line: one subcommand per workflow rule, calling the same functions.

The parsers of every subcommand are defined with argparse alone, in one module per conda
environment of the workflow (:mod:`.slides`, :mod:`.expression`, :mod:`.learn`); each names the
function that runs it in the matching ``run_*`` module, imported only when that subcommand runs. So ``m2ost tile`` works
in the slides environment, which has no torch, and ``m2ost --help`` lists everything anywhere.

Bad input ends with one line on stderr, ``m2ost: error: [sample S, file F] problem``, and exit
status 1. Where stderr goes elsewhere than stdout (a workflow rule sends stderr to its log), the
line is written to stdout too, so that it reaches the terminal of the Snakemake run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from m2ost import __version__
from m2ost.cli import expression, learn, slides
from m2ost.errors import InputError, TrainingDiverged


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2ost", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"m2ost {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (slides, expression, learn):
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    module_name, _, function = args.handler.partition(":")
    handler = getattr(importlib.import_module(module_name), function)
    try:
        handler(args)
    except (InputError, TrainingDiverged) as err:
        print(f"m2ost: error: {err}", file=sys.stderr)
        if _stdout_is_elsewhere():
            print(f"m2ost: error: {err}", flush=True)
        return 1
    return 0


def _stdout_is_elsewhere() -> bool:
    """Whether stdout and stderr lead to different places (not one terminal or one file)."""
    try:
        return not os.path.samestat(os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno()))
    except (OSError, ValueError, AttributeError):  # closed or replaced streams (pytest's capture)
        return False
