"""The HTTP API in-process against a real stack: the session's hub, a leaf per node, gatings on the
demo model (each with an embedded host holding every expert, or none: a node whose experts do not
answer), and the API server (uvicorn on a free loopback port) connected to the hub like `prism up`'s."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError

from services.api.server import HttpServer
from services.api.service import build
from services.api.settings import ApiSettings
from services.gating.service import Gating
from shared import subjects
from shared.nats_server import NatsServer, free_port
from shared.schemas import GatingLoad
from tests.serving.conftest import LocalCluster

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
ALL_EXPERTS = "*:*"


class ApiStack:
    """A LocalCluster plus API servers on it; `url(api)` is an API's base URL for OpenAI clients."""

    def __init__(self, cluster: LocalCluster, hub: NatsServer) -> None:
        self.cluster = cluster
        self.hub = hub
        self.servers: list[HttpServer] = []
        self._clients: list[NatsClient] = []

    async def add_api(self, **settings: Any) -> HttpServer:
        nc = await nats.connect(self.hub.cfg.client_url())
        self._clients.append(nc)
        defaults: dict[str, Any] = {"model": DEMO, "port": free_port(), "nats_url": self.hub.cfg.client_url()}
        server = HttpServer(build(nc, ApiSettings(**{**defaults, **settings})))
        await server.start()
        self.servers.append(server)
        return server

    @staticmethod
    def url(server: HttpServer, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{server.port}/v1"

    async def add_gating_node(self, name: str, model: Path, **settings: Any) -> Gating:
        """Node `name` with a gating, once the hub (where the API publishes) reaches its intake: a new
        leaf's subscriptions reach the hub a moment after the gating starts, and a request sent before
        would be answered "no responders"."""
        await self.cluster.add_node(name)
        gating = await self.cluster.add_gating(name, model, **settings)
        nc = await nats.connect(self.hub.cfg.client_url())
        try:
            async with asyncio.timeout(10):
                while True:
                    try:  # an empty object is a bad request: any answer proves the way there
                        await nc.request(subjects.infer(self.cluster.node(name)), b"{}", timeout=1)
                        return gating
                    except NoRespondersError:
                        await asyncio.sleep(0.02)
        finally:
            await nc.close()

    async def load(self, node: str) -> GatingLoad:
        """The node's gating load as its `$SRV.STATS` reply tells it (what the API reads)."""
        nc = await nats.connect(self.hub.cfg.client_url())
        try:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish(f"$SRV.STATS.{subjects.SERVICE_GATING}", b"", reply=inbox)
            while True:
                reply = json.loads((await sub.next_msg(timeout=5)).data)
                load = GatingLoad.model_validate(reply["endpoints"][0]["data"]["load"])
                if load.node == node:
                    return load
        finally:
            await nc.close()

    async def wait_load(self, node: str, *, active: int, cancelled: int, timeout_s: float = 10.0) -> GatingLoad:
        """Poll the node's stats until it reports `active` sequences and `cancelled` cancels."""
        return await self.wait_for(node, lambda load: (load.active, load.cancelled) == (active, cancelled), timeout_s)

    async def wait_for(self, node: str, check: Callable[[GatingLoad], bool], timeout_s: float = 10.0) -> GatingLoad:
        """Poll the node's stats until `check` holds."""
        async with asyncio.timeout(timeout_s):
            while True:
                load = await self.load(node)
                if check(load):
                    return load
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        for server in self.servers:
            await server.stop()
        for nc in self._clients:
            await nc.close()
        await self.cluster.close()


@pytest.fixture(scope="module")
async def stack(nats_hub: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ApiStack]:
    """Node `ok` (every expert embedded in its gating) and the API; tests add what else they need."""
    import uuid

    cluster = LocalCluster(nats_hub, tmp_path_factory.mktemp("api"), "a" + uuid.uuid4().hex[:8])
    s = ApiStack(cluster, nats_hub)
    try:
        await cluster.add_node("ok")
        await cluster.add_gating("ok", DEMO, embedded={"h-ok": ALL_EXPERTS})
        await cluster.settle()
        yield s
    finally:
        await s.close()
