"""`prism`: one entry point, one module per subcommand.

Each module in COMMANDS defines `register(subparsers)`, which adds its parser and sets
`func=handler`; a handler takes the parsed arguments and returns the exit code. Modules are
imported only to register, so heavy imports (torch, nats) belong inside the handlers.
"""

from __future__ import annotations

import argparse
import importlib
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prism", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
