"""`prism up`'s readiness probe of a node (cli/readiness.py) against a real nats-server: a node whose
gating or one of its peers is still starting is asked again; any other error reply stops the start."""

from __future__ import annotations

import json

import nats
import pytest
from nats.aio.msg import Msg

from cli.client import PrismClient
from cli.readiness import node_ready
from cli.stack_plan import StackError
from shared.nats_server import NatsServer


async def _answering(hub: NatsServer, node: str, codes: list[str]) -> tuple[nats.NATS, list[str]]:
    """A stand-in gating on prism.v1.infer.<node>: answers each request with the next error code of
    `codes`, then with a one-token final reply; returns its connection and the codes it has sent."""
    nc = await nats.connect(hub.cfg.client_url())
    sent: list[str] = []

    async def on_request(msg: Msg) -> None:
        if len(sent) < len(codes):
            sent.append(codes[len(sent)])
            body = {"id": None, "error": {"code": sent[-1], "message": "a stand-in's error"}}
        else:
            body = {"id": None, "done": True, "text": "", "token_ids": [1], "finish_reason": "length"}
        await msg.respond(json.dumps(body).encode())

    await nc.subscribe(f"prism.v1.infer.{node}", cb=on_request)
    await nc.flush()
    return nc, sent


async def test_a_node_whose_route_peer_is_starting_is_asked_again(nats_hub: NatsServer, unique: str) -> None:
    gating, sent = await _answering(nats_hub, unique, ["route_unavailable", "expert_unavailable"])
    client = await PrismClient.connect(nats_hub.cfg.client_url())
    try:
        assert not await node_ready(client, unique)  # a chain through a peer that is not subscribed yet
        assert not await node_ready(client, unique)
        assert await node_ready(client, unique)
        assert sent == ["route_unavailable", "expert_unavailable"]
    finally:
        await client.close()
        await gating.close()


async def test_any_other_error_stops_the_start(nats_hub: NatsServer, unique: str) -> None:
    gating, _ = await _answering(nats_hub, unique, ["internal"])
    client = await PrismClient.connect(nats_hub.cfg.client_url())
    try:
        with pytest.raises(StackError, match="internal"):
            await node_ready(client, unique)
    finally:
        await client.close()
        await gating.close()
