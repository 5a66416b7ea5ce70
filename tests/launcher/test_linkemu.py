"""The link emulator adds its one-way delay per direction, holds its rate, keeps byte order, and
slows a real NATS leaf connection by at least a round trip of delays."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from shared.linkemu import LinkEmulator, LinkEmulatorError, LinkShape
from shared.nats_server import LeafRemote, NatsServer, ServerConfig, free_port


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    """A TCP echo server on 127.0.0.1; yields its port."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def round_trips(port: int, n: int) -> list[float]:
    """Seconds per 100-byte round trip, n times over one connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    try:
        for i in range(n):
            payload = bytes([i % 256]) * 100
            started = time.perf_counter()
            writer.write(payload)
            await writer.drain()
            assert await reader.readexactly(100) == payload
            times.append(time.perf_counter() - started)
    finally:
        writer.close()
    return times


async def test_round_trip_takes_two_one_way_delays() -> None:
    delay = 0.02
    async with echo_server() as port, LinkEmulator("127.0.0.1", port, LinkShape(delay_s=delay)) as link:
        direct = await round_trips(port, 5)
        emulated = await round_trips(link.port, 5)
    assert min(emulated) >= 2 * delay, emulated  # delivery is never early, in either direction
    assert statistics.median(emulated) - statistics.median(direct) >= 2 * delay - 0.001
    assert statistics.median(emulated) < 2 * delay + 0.1, emulated  # and it adds no more than a little


async def test_rate_is_held_within_ten_percent_in_each_direction() -> None:
    rate = 4e6  # bytes/s
    size = 2_000_000  # 0.5 s of link time
    async with echo_server() as port, LinkEmulator("127.0.0.1", port, LinkShape(rate_Bps=rate)) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        data = os.urandom(size)
        started = time.perf_counter()
        writer.write(data)
        got = await reader.readexactly(size)
        elapsed = time.perf_counter() - started
        writer.close()
    assert got == data  # order and content preserved
    # Both directions are paced: the echo starts as the first bytes arrive, so the last byte comes
    # back after about size / rate (pipelined), not 2 × size / rate (which would mean one link).
    measured = size / elapsed
    assert abs(measured - rate) / rate < 0.10, f"measured {measured / 1e6:.2f} MB/s, configured {rate / 1e6:.2f}"
    assert link.stats.upstream_bytes == size
    assert link.stats.downstream_bytes == size


async def test_upstream_alone_is_paced() -> None:
    """A one-way transfer: bytes reach the target at the configured rate (not just the echo)."""
    rate = 2e6
    size = 1_000_000
    received = asyncio.Event()
    arrival: list[float] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(65536):
            total += len(data)
            if total >= size:
                arrival.append(time.perf_counter())
                received.set()
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with LinkEmulator("127.0.0.1", port, LinkShape(delay_s=0.01, rate_Bps=rate)) as link:
        _, writer = await asyncio.open_connection("127.0.0.1", link.port)
        started = time.perf_counter()
        writer.write(b"x" * size)
        async with asyncio.timeout(10):
            await received.wait()
        writer.close()
    server.close()
    elapsed = arrival[0] - started - 0.01
    measured = size / elapsed
    assert abs(measured - rate) / rate < 0.10, f"measured {measured / 1e6:.2f} MB/s, configured {rate / 1e6:.2f}"


async def test_order_is_preserved_for_many_small_writes() -> None:
    async with echo_server() as port, LinkEmulator("127.0.0.1", port, LinkShape(0.002, 20e6)) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        chunks = [os.urandom(n) for n in (1, 7, 300, 20_000, 3, 70_000, 5) * 20]
        for chunk in chunks:
            writer.write(chunk)
        expected = b"".join(chunks)
        got = await reader.readexactly(len(expected))
        writer.close()
    assert got == expected


async def test_bad_shapes_and_taken_ports_are_clear_errors() -> None:
    with pytest.raises(LinkEmulatorError, match="delay_s"):
        LinkShape(delay_s=-1)
    with pytest.raises(LinkEmulatorError, match="rate_Bps"):
        LinkShape(rate_Bps=0)
    assert LinkShape.from_ms_mbit(2, 8).rate_Bps == 1e6
    async with echo_server() as port:
        with pytest.raises(LinkEmulatorError, match="cannot listen"):
            await LinkEmulator("127.0.0.1", port, LinkShape(), listen_port=port).start()


async def _timed_requests(nc: nats.NATS, subject: str, n: int) -> list[float]:
    # Interest crosses the leaf connection asynchronously: retry until the subscriber is reachable.
    async with asyncio.timeout(10):
        while True:
            try:
                await nc.request(subject, b"ping", timeout=1)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.05)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await nc.request(subject, b"ping", timeout=2)
        times.append(time.perf_counter() - started)
    return times


async def test_nats_request_across_an_emulated_leaf_link(nats_hub: NatsServer, tmp_path: Path, unique: str) -> None:
    delay = 0.015
    hub_leaf = nats_hub.cfg.leaf_port
    assert hub_leaf is not None
    async with LinkEmulator("127.0.0.1", hub_leaf, LinkShape(delay_s=delay)) as link:
        leaf_cfg = ServerConfig(
            name=f"{unique}-leaf",
            port=free_port(),
            leaf_remotes=(LeafRemote(f"nats://127.0.0.1:{link.port}"),),
            max_payload=nats_hub.cfg.max_payload,
        )
        async with NatsServer(leaf_cfg, tmp_path):
            hub_nc = await nats.connect(nats_hub.cfg.client_url())
            leaf_nc = await nats.connect(leaf_cfg.client_url())
            try:

                async def answer(msg: nats.aio.msg.Msg) -> None:
                    await msg.respond(b"pong")

                await hub_nc.subscribe(f"{unique}.remote", cb=answer)  # only across the link
                await leaf_nc.subscribe(f"{unique}.local", cb=answer)
                await hub_nc.flush()
                await leaf_nc.flush()
                local = await _timed_requests(leaf_nc, f"{unique}.local", 10)
                remote = await _timed_requests(leaf_nc, f"{unique}.remote", 10)
            finally:
                await leaf_nc.close()
                await hub_nc.close()
    assert min(remote) >= 2 * delay, remote
    assert statistics.median(remote) - statistics.median(local) >= 2 * delay - 0.001, (local, remote)
    assert link.stats.connections >= 1
