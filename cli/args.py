"""What the commands share on their command lines: argument types (argparse turns their
ArgumentTypeError into a one-line usage error), the connection flags of the client commands, exit codes."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

EXIT_ERROR = 1  # the command ran and failed (an error reply, no server)
EXIT_USAGE = 2  # as argparse: the command line cannot work
DEFAULT_URL = "nats://127.0.0.1:4222"


def port_number(text: str) -> int:
    """A TCP port for argparse: 0-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {port}")
    return port


def positive(text: str) -> float:
    """A finite number > 0 for argparse."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def at_least(low: float) -> Callable[[str], float]:
    """A finite number >= `low` for argparse."""

    def check(text: str) -> float:
        value = _number(text)
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text}")
        return value

    return check


non_negative = at_least(0.0)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """--url (default $PRISM_URL, else the local hub), --user, --password: shared by the client commands."""
    p.add_argument("--url", default=os.environ.get("PRISM_URL", DEFAULT_URL),
                   help=f"NATS URL (default $PRISM_URL, else {DEFAULT_URL})")
    p.add_argument("--user", help="NATS user, where the server requires credentials")
    p.add_argument("--password", help="NATS password")
