"""The API's HTTP server: uvicorn on a socket bound here, started and stopped by the service's own signals."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Generator

import structlog
import uvicorn

from services.api.service import Api

log = structlog.get_logger()


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the service's stop event owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); OSError when the port is taken or the address is not ours."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class HttpServer:
    """`start()` binds and serves `api`; `stop()` lets running responses end within `drain_timeout_s`."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        settings = self.api.settings
        sock = bind(settings.host, settings.port)
        self.port = sock.getsockname()[1]
        await self.api.gateway.start()
        config = uvicorn.Config(
            self.api.app(), lifespan="off", log_config=None, access_log=False,
            timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        async with asyncio.timeout(10):
            while not self._server.started:
                if self._task.done():
                    self._task.result()  # its exception
                    raise OSError("the HTTP server stopped while starting")
                await asyncio.sleep(0.01)
        log.info("api_started", url=f"http://{settings.host}:{self.port}", model=self.api.model,
                 key_required=settings.key is not None)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
        await self.api.gateway.stop()
        log.info("api_stopped")
