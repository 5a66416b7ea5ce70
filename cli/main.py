"""`prism`: one entry point, one module per subcommand.

(The parser's description is DESCRIPTION below, for users; this docstring is for developers.)

Each module in COMMANDS defines `register(subparsers)`, which adds its parser and sets
`func=handler`; a handler takes the parsed arguments and returns the exit code. Modules are
imported only to register, so heavy imports (torch, nats) belong inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: tuple[str, ...] = (
    "cli.trace",
    "cli.place",
    "cli.sim",
    "cli.run",
    "cli.up",
    "cli.infer",
    "cli.status",
    "cli.demo",
)


DESCRIPTION = ("Prism serves one Mixture-of-Experts model across several edge nodes over NATS. "
               "Start with `prism demo`; `prism up` keeps serving.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description=DESCRIPTION)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `prism place --json | head`: the reader left; end quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit's flush)
        code = 1
    sys.exit(code)
