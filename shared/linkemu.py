"""A user-space network link emulator: an asyncio TCP relay with a one-way delay and a rate.

`tc netem` is not available on the build machines, so the launcher puts this relay on each leaf
node's connection to the hub. Every connection accepted on `listen_host:port` is relayed to
`target_host:target_port`; each direction is an independent link:

- rate: bytes leave the sender's side of the link one after another at `rate_Bps` bytes/s
  (a chunk of n bytes occupies the link for n / rate seconds, after the chunks before it);
- delay: a chunk is delivered `delay_s` seconds after it has been put on the link.

So a chunk read at time t is written at `max(t, link_free) + n / rate + delay`; delivery times
never decrease, so byte order is preserved. Large reads are cut into pieces (16 KiB, or what the
rate carries in 1 ms when that is more) so pacing stays smooth without a timer per few bytes.
Times come from `time.monotonic()`, not the loop clock:
uvloop's clock has 1 ms steps and its timers may fire up to 1 ms early, and a delay must never be
shorter than configured. Run it on uvloop (`prism up` does): on asyncio's own loop a timer fires
late, and each traversal took about 0.9 ms more than on uvloop (an 8 ms round trip across the hub,
four traversals: 13.1 ms against 9.4 ms, loopback, 2 cores). The queue per direction is bounded
(backpressure to the sender, as a real TCP window would), and closing either side closes the relay of
that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field

PIECE_BYTES = 16 * 1024
"""Smallest piece size the emulated link is paced in (bytes)."""

MAX_PIECE_BYTES = 256 * 1024

QUEUE_PIECES = 4096
"""Pieces in flight per direction before the relay stops reading (at most 4096 × 256 KiB)."""

_READ_BYTES = 256 * 1024


class LinkEmulatorError(RuntimeError):
    """The relay could not listen (port taken) or was misconfigured."""


@dataclass(frozen=True)
class LinkShape:
    """One-way delay (seconds, >= 0) and rate (bytes/s, > 0; None = unlimited) of each direction."""

    delay_s: float = 0.0
    rate_Bps: float | None = None  # noqa: N815 - B = bytes (bps would read as bits)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delay_s) and self.delay_s >= 0):
            raise LinkEmulatorError(f"delay_s must be a finite number >= 0, got {self.delay_s}")
        if self.rate_Bps is not None and not (math.isfinite(self.rate_Bps) and self.rate_Bps > 0):
            raise LinkEmulatorError(f"rate_Bps must be > 0 bytes/s or None (unlimited), got {self.rate_Bps}")

    @classmethod
    def from_ms_mbit(cls, delay_ms: float, rate_mbit: float | None) -> LinkShape:
        """From a one-way delay in milliseconds and a rate in Mbit/s (None = unlimited)."""
        return cls(delay_ms / 1000.0, None if rate_mbit is None else rate_mbit * 1e6 / 8)

    @property
    def piece_bytes(self) -> int:
        """Bytes per paced piece: 16 KiB, or 1 ms worth of the rate, at most 256 KiB."""
        per_ms = int(self.rate_Bps / 1000) if self.rate_Bps else 0
        return min(MAX_PIECE_BYTES, max(PIECE_BYTES, per_ms))

    @property
    def is_ideal(self) -> bool:
        """No delay and no rate limit: the relay would only add its own overhead."""
        return self.delay_s == 0 and self.rate_Bps is None


@dataclass
class LinkStats:
    """Bytes relayed per direction (upstream: client → target) and connections accepted."""

    upstream_bytes: int = 0
    downstream_bytes: int = 0
    connections: int = 0


@dataclass
class _Direction:
    """One direction of one connection: the time the emulated link is next free (monotonic, s)."""

    shape: LinkShape
    link_free: float = 0.0
    queue: asyncio.Queue[tuple[float, bytes] | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=QUEUE_PIECES)
    )

    def schedule(self, now: float, size: int) -> float:
        """Delivery time (monotonic, s) of a piece of `size` bytes read at `now`."""
        start = max(now, self.link_free)
        self.link_free = start + (size / self.shape.rate_Bps if self.shape.rate_Bps else 0.0)
        return self.link_free + self.shape.delay_s


class LinkEmulator:
    """Relay `listen_host:listen_port` → `target_host:target_port` through an emulated link.

    `async with LinkEmulator("127.0.0.1", 7422, LinkShape(0.002, 62.5e6)) as link:` then connect to
    `link.port`. `listen_port=0` picks a free port. `stop()` closes the listener and every relayed
    connection.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        shape: LinkShape,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target = (target_host, target_port)
        self.shape = shape
        self.listen = (listen_host, listen_port)
        self.stats = LinkStats()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The port the relay listens on (after `start`)."""
        if self._server is None:
            raise LinkEmulatorError("the link emulator is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._on_client, *self.listen)
        except OSError as exc:
            where = f"{self.listen[0]}:{self.listen[1]}"
            raise LinkEmulatorError(f"link emulator cannot listen on {where}: {exc}") from None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(OSError):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> LinkEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._relay(reader, writer), name=f"link-{self.target[1]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        """Relay one accepted connection until either side closes."""
        self.stats.connections += 1
        self._writers.add(client_w)
        try:
            target_r, target_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            self._writers.discard(client_w)
            return
        self._writers.add(target_w)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(client_r, target_w, upstream=True))
                group.create_task(self._pump(target_r, client_w, upstream=False))
        except* (OSError, EOFError):
            pass  # one side went away; both are closed below
        finally:
            for writer in (client_w, target_w):
                writer.close()
                self._writers.discard(writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        """Read → schedule → deliver for one direction; at EOF, delivers what is queued, then half-closes."""
        direction = _Direction(self.shape)
        deliver = asyncio.create_task(self._deliver(direction, writer, upstream=upstream))
        step = self.shape.piece_bytes
        try:
            while data := await reader.read(_READ_BYTES):
                now = time.monotonic()
                for start in range(0, len(data), step):
                    piece = data[start : start + step]
                    await direction.queue.put((direction.schedule(now, len(piece)), piece))
            await direction.queue.put(None)
            await deliver
        finally:
            deliver.cancel()
        # Pass the half-close on; the connection ends when both directions have ended.
        if writer.can_write_eof():
            writer.write_eof()

    async def _deliver(self, direction: _Direction, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        queue = direction.queue
        while (item := await queue.get()) is not None:
            due, piece = item
            await _sleep_until(due)  # returns without a timer when the piece is already due
            writer.write(piece)
            if upstream:
                self.stats.upstream_bytes += len(piece)
            else:
                self.stats.downstream_bytes += len(piece)
            await writer.drain()  # returns at once below the transport's high-water mark


async def _sleep_until(due: float) -> None:
    """Sleep until `time.monotonic() >= due`; sleeps again when a timer fires early (uvloop: 1 ms steps)."""
    while (wait := due - time.monotonic()) > 0:  # noqa: ASYNC110 - a deadline, not an event to wait for
        await asyncio.sleep(wait)
