"""Real nats-server processes: the hub fixture works, leaves prefer local queue subscribers, ports are checked."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import nats
import pytest

from shared.nats_server import (
    LeafRemote,
    NatsServer,
    NatsServerError,
    ServerConfig,
    free_port,
    port_is_free,
    render_config,
)


async def test_hub_has_jetstream_in_domain(nats_hub: NatsServer, unique: str) -> None:
    nc = await nats.connect(nats_hub.cfg.client_url())
    try:
        kv = await nc.jetstream(domain="hub").create_key_value(bucket=unique)
        await kv.put("k", b"v")
        assert (await kv.get("k")).value == b"v"
    finally:
        await nc.close()


async def test_taken_port_is_a_clear_error(nats_hub: NatsServer, tmp_path: Path) -> None:
    cfg = ServerConfig(name="clash", port=nats_hub.cfg.port)
    with pytest.raises(NatsServerError, match=f"port 127.0.0.1:{nats_hub.cfg.port} is already in use"):
        await NatsServer(cfg, tmp_path).start()


async def test_leaf_prefers_local_queue_subscriber(nats_hub: NatsServer, tmp_path: Path, unique: str) -> None:
    hub_leaf = LeafRemote(f"nats://127.0.0.1:{nats_hub.cfg.leaf_port}")
    leaves = [ServerConfig(name=f"{unique}-{i}", port=free_port(), leaf_remotes=(hub_leaf,)) for i in range(2)]
    async with NatsServer(leaves[0], tmp_path) as a, NatsServer(leaves[1], tmp_path) as b:
        nc_a, nc_b = await nats.connect(a.cfg.client_url()), await nats.connect(b.cfg.client_url())
        served = {"a": 0, "b": 0}

        def responder(name: str):
            async def handle(msg: nats.aio.msg.Msg) -> None:
                served[name] += 1
                await msg.respond(b"ok")

            return handle

        subject = f"{unique}.work"
        await nc_a.subscribe(subject, queue="q", cb=responder("a"))
        await nc_b.subscribe(subject, queue="q", cb=responder("b"))
        await nc_a.flush()
        await nc_b.flush()
        await asyncio.sleep(0.3)  # interest crosses the leaf connections asynchronously
        for _ in range(50):
            await nc_a.request(subject, b"x", timeout=2)
        assert served == {"a": 50, "b": 0}
        await nc_a.close()
        await nc_b.close()


def test_rendered_config_listens_on_loopback_only() -> None:
    text = render_config(ServerConfig(name="x", port=1, http_port=2, mqtt_port=3, leaf_port=4))
    assert 'listen: "127.0.0.1:1"' in text
    assert "0.0.0.0" not in text


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    from shared.nats_server import _ephemeral_range_start, free_port, port_is_free

    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < _ephemeral_range_start() and port_is_free(p) for p in ports)


def test_a_reserved_port_is_never_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """`prism up --monitor-port P` reserves P before the hub's leaf port is drawn: nothing listens on P
    yet, so without the reservation the draw could return P and the hub could not bind both."""
    import shared.nats_server as ns

    told, other = 20001, 20002
    draws = iter([told, told, other])
    monkeypatch.setattr(ns.random, "randint", lambda low, high: next(draws))
    monkeypatch.setattr(ns, "_handed_out", set())
    monkeypatch.setattr(ns, "port_is_free", lambda port, host="127.0.0.1": True)
    ns.reserve_ports(told, None, 0)
    assert ns.free_port() == other


def test_a_port_in_time_wait_is_free_and_a_listening_one_is_not() -> None:
    """A server stopped a moment ago leaves its side of closed connections in TIME_WAIT; the port can
    be listened on again at once (`prism up` on the same port right after a stop said "in use")."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert not port_is_free(port)
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server's side closes first: TIME_WAIT on (port, client port)
    client.close()
    server.close()
    assert port_is_free(port)
