"""What every service's `main` shares: connecting to NatsClient, waiting for a stop signal, running on uvloop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.micro import add_service
from nats.micro.service import Service, ServiceConfig

from shared.errors import PrismError
from shared.settings import ServiceSettings, from_cli

S = TypeVar("S", bound=ServiceSettings)
T = TypeVar("T")

log = structlog.get_logger()


async def connect(settings: ServiceSettings, name: str) -> NatsClient:
    """Connect with reconnects; connection problems are logged here, never left to nats-py's defaults."""

    client: list[NatsClient] = []  # set once connected: the callbacks tell a stop from a lost server

    async def on_error(exc: Exception) -> None:
        log.warning("nats_error", client=name, error=repr(exc))

    async def on_disconnect() -> None:
        stopping = bool(client) and (client[0].is_draining or client[0].is_closed)
        (log.info if stopping else log.warning)("nats_disconnected", client=name)

    async def on_reconnect() -> None:
        log.info("nats_reconnected", client=name)

    nc = await nats.connect(
        settings.nats_url,
        name=name,
        user=settings.nats_user,
        password=settings.nats_password,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        max_reconnect_attempts=-1,
        connect_timeout=5,
    )
    client.append(nc)
    return nc


async def announce(nc: NatsClient, name: str, metadata: dict[str, str]) -> Service:
    """Register a nats.micro service without endpoints: discoverable (and a readiness signal) with
    `$SRV.PING.<name>` once the component has started."""
    service: Service = await add_service(nc, ServiceConfig(name=name, version="1.0.0", metadata=metadata))
    return service


def stop_event() -> asyncio.Event:
    """An Event set by SIGINT or SIGTERM."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `main()` on uvloop where available, else asyncio; its result."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is pinned on every supported platform
        return asyncio.run(main())
    return uvloop.run(main())


async def serve_until_stopped(start: Awaitable[None], stop: Callable[[], Awaitable[None]], nc: NatsClient) -> None:
    """Start a component, wait for SIGINT/SIGTERM, stop it, drain the connection."""
    stopped = stop_event()
    await start
    await stopped.wait()
    await stop()
    try:
        async with asyncio.timeout(5.0):  # a server that is gone would keep drain reconnecting
            await nc.drain()
    except Exception:  # the server may already be gone (e.g. the launcher was killed): just close
        await nc.close()


def run_service(cls: type[S], main: Callable[[S], Coroutine[Any, Any, None]], name: str) -> None:
    """A service's entry point: settings from the environment and flags, then `main(settings)`.

    What an operator gets wrong is one line on stderr, not a traceback: a bad value (exit 2), a
    `PRISM_<SERVICE>_*` variable that is no setting (exit 2: a typo must not silently leave the default),
    a start that fails on the model, the experts or the NATS server (exit 1)."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from shared.schemas import describe_validation_error

    try:
        settings = from_cli(cls)
    except ValidationError as exc:
        _exit(2, name, describe_validation_error(exc))
    except SettingsError as exc:  # a JSON-valued variable (EMBEDDED_HOSTS, LINKS, ROUTE) that is not JSON
        _exit(2, name, f"{exc}: the value must be JSON")
    if unknown := unknown_variables(cls):
        _exit(2, name, f"{', '.join(unknown)}: no such setting (see python -m services.{name} --help)")
    try:
        run(lambda: main(settings))
    except (ValueError, PrismError, OSError, nats.errors.NoServersError) as exc:  # ValueError: model, experts
        _exit(1, name, str(exc) or type(exc).__name__)


def unknown_variables(cls: type[ServiceSettings]) -> list[str]:
    """Environment variables with the settings' prefix that name no field."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    fields = {f.upper() for f in cls.model_fields}
    return sorted(k for k in os.environ if prefix and k.startswith(prefix) and k[len(prefix):] not in fields)


def _exit(code: int, name: str, message: str) -> NoReturn:
    print(f"{name}: error: {message}", file=sys.stderr)
    sys.exit(code)
