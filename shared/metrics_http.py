"""Serve a registry as Prometheus text on `http://<bind>:<port>/metrics`, on the service's event loop.

Why not prometheus_client's `start_http_server`: it scrapes on a thread of its own, and the collectors
of shared/metrics.py read state that the event loop mutates (a host's resident experts, a gating's
queue). Here a scrape runs on the loop between two of its callbacks: consistent, and no locks.
A scrape of a demo-model gating with two embedded hosts took 0.49 ms of loop time (bench/metrics.py,
2-core development machine): about a third of one batch-1 decode step, every scrape interval.

One request per connection (HTTP/1.1 with `Connection: close`): GET or HEAD `/metrics` (a query
string is ignored) → 200; another path → 404; another method → 405; a request head that is not
HTTP, larger than 16 KiB or slower than `HEAD_TIMEOUT_S` → the connection is closed. Nothing here
imports nats.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = structlog.get_logger()

HEAD_LIMIT = 16 * 1024  # bytes of request line and headers
HEAD_TIMEOUT_S = 5.0
PATH = "/metrics"


class MetricsServer:
    """`await start()` listens (port 0: a free one, the bound port is returned); `await close()` stops."""

    def __init__(self, registry: CollectorRegistry, bind: str = "127.0.0.1", port: int = 0) -> None:
        self.registry = registry
        self.bind = bind
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.bind, self.port, limit=HEAD_LIMIT)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # a scraper that never reads must not hold a stop
                    await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path = _request_line(head)
            status, body = self._answer(method, path)
            kind = CONTENT_TYPE_LATEST if status.startswith("200") else "text/plain; charset=utf-8"
            headers = (f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                       "Connection: close\r\n\r\n")
            writer.write(headers.encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # not a scrape we can answer: closing is the answer
        finally:
            writer.close()

    def _answer(self, method: str, path: str) -> tuple[str, bytes]:
        if path != PATH:
            return "404 Not Found", f"not found; metrics are at {PATH}\n".encode()
        if method not in {"GET", "HEAD"}:
            return "405 Method Not Allowed", b"GET or HEAD only\n"
        try:
            return "200 OK", generate_latest(self.registry)
        except Exception:  # a collector's bug costs this scrape, not the service
            log.exception("metrics_scrape_failed")
            return "500 Internal Server Error", b"collecting the metrics failed; see the service's log\n"


def _request_line(head: bytes) -> tuple[str, str]:
    """(method, path without query) of an HTTP request head; ValueError when it is not one."""
    method, target, version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    if not version.startswith("HTTP/"):
        raise ValueError(version)
    return method, target.split("?", 1)[0]


@contextlib.asynccontextmanager
async def serve_metrics(registry: CollectorRegistry, bind: str, port: int, service: str) -> AsyncIterator[int | None]:
    """Serve `registry` while the block runs, on `bind:port`; port 0 is off (yields None, else the port).
    A port in use raises OSError: the service does not start (what an operator asked for is not there)."""
    if port == 0:
        yield None
        return
    server = MetricsServer(registry, bind, port)
    await server.start()
    log.info("metrics_serving", service=service, url=f"http://{bind}:{server.port}{PATH}")
    try:
        yield server.port
    finally:
        await server.close()
