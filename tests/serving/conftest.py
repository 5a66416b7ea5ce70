"""A real multi-node Prism in one event loop: a hub, one leaf nats-server per node, gating and expert
hosts as in-process components connected to their node's leaf (so queue groups prefer local holders)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import torch
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError

from services.expert_host.service import ExpertHost, ExpertHostSettings, load_weights
from services.gating.service import Gating, GatingSettings, build
from shared.nats_server import LeafRemote, NatsServer, ServerConfig, free_port
from tests.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"), seed=1)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen2"), seed=2)


class LocalCluster:
    """Leaves and services for one test; `close()` stops everything it started."""

    def __init__(self, hub: NatsServer, workdir: Path, prefix: str) -> None:
        self.hub = hub
        self.workdir = workdir
        self.prefix = prefix
        self.leaves: dict[str, NatsServer] = {}
        self.hosts: dict[str, ExpertHost] = {}
        self.gatings: dict[str, Gating] = {}
        self._clients: list[NatsClient] = []

    def node(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    async def add_node(self, name: str, leaf_url: str | None = None) -> str:
        """Start a leaf for node `name`; its hub link goes to `leaf_url` (e.g. a link emulator) if given."""
        url = leaf_url or f"nats://127.0.0.1:{self.hub.cfg.leaf_port}"
        cfg = ServerConfig(name=self.node(name), port=free_port(), leaf_remotes=(LeafRemote(url),))
        leaf = NatsServer(cfg, self.workdir)
        await leaf.start()
        self.leaves[name] = leaf
        return cfg.client_url()

    async def connect(self, node: str) -> NatsClient:
        nc = await nats.connect(self.leaves[node].cfg.client_url())
        self._clients.append(nc)
        return nc

    async def add_host(self, node: str, host: str, model: Path, experts: str, **kw: Any) -> ExpertHost:
        name = f"{self.prefix}-{host}"
        settings = ExpertHostSettings(host=name, node=self.node(node), model=model, experts=experts, **kw)
        weights, hidden = load_weights(settings)
        expert_host = ExpertHost(await self.connect(node), settings, weights, hidden)
        await expert_host.start()
        self.hosts[host] = expert_host
        return expert_host

    async def add_gating(self, node: str, model: Path, embedded: dict[str, str] | None = None, **kw: Any) -> Gating:
        """A gating for `node`; `embedded` maps host names to expert specs of hosts in its process."""
        hosts = [{"host": f"{self.prefix}-{h}", "experts": spec} for h, spec in (embedded or {}).items()]
        settings = GatingSettings(node=self.node(node), model=model, embedded_hosts=hosts, **kw)
        gating = build(await self.connect(node), settings)
        await gating.start()
        self.gatings[node] = gating
        return gating

    async def settle(self, timeout_s: float = 10.0) -> None:
        """Wait until every node reaches a holder of every hosted expert (interest crosses leaves lazily).

        An empty payload is a probe every holder answers: a reply proves the route, "no responders" means
        the interest has not arrived yet.
        """
        from shared import subjects

        hosts = [*self.hosts.values(), *(h for g in self.gatings.values() for h in g.hosts)]
        keys = sorted({key for host in hosts for key in host.weights})
        async with asyncio.timeout(timeout_s):
            for node in self.leaves:
                nc = await self.connect(node)
                for key in keys:
                    while True:
                        try:
                            await nc.request(subjects.expert(*key), b"", timeout=1)
                            break
                        except NoRespondersError:
                            await asyncio.sleep(0.01)

    def embedded(self, node: str, host: str) -> ExpertHost:
        """The embedded host `host` of `node`'s gating."""
        return next(h for h in self.gatings[node].hosts if h.settings.host == f"{self.prefix}-{host}")

    async def close(self) -> None:
        for gating in self.gatings.values():
            await gating.stop()
        for host in self.hosts.values():
            await host.stop()
        for nc in self._clients:
            with contextlib.suppress(Exception):
                await nc.close()
        for leaf in self.leaves.values():
            await leaf.stop()


@pytest.fixture
async def cluster(nats_hub: NatsServer, tmp_path: Path, unique: str) -> AsyncIterator[LocalCluster]:
    c = LocalCluster(nats_hub, tmp_path, unique)
    try:
        yield c
    finally:
        await c.close()


async def ask(nc: NatsClient, node: str, body: dict[str, Any] | bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """One non-streaming request; returns the JSON reply and its headers."""
    from shared import subjects

    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request(subjects.infer(node), payload, timeout=30)
    return json.loads(msg.data), dict(msg.headers or {})


async def ask_all(cluster: LocalCluster, nodes: list[str], batch: list[list[int]], max_tokens: int) -> list[dict]:
    """Greedy requests, prompt i to node `nodes[i]`, all at once; the JSON replies in order."""
    clients = {n: await cluster.connect(n) for n in set(nodes)}
    async with asyncio.timeout(90):
        replies = await asyncio.gather(*(
            ask(clients[n], cluster.node(n), {"input_ids": p, "max_tokens": max_tokens})
            for n, p in zip(nodes, batch, strict=True)
        ))
    return [r for r, _ in replies]


def reference(model_dir: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy generation in one process: the oracle a distributed run must match."""
    from shared.model.generate import generate
    from shared.model.model import MoEModel
    from shared.model.moe import LocalExperts
    from shared.model.sampling import SamplingParams
    model = MoEModel.from_checkpoint(model_dir)
    experts = LocalExperts.from_checkpoint(model_dir)
    with torch.inference_mode():  # stops at the config's EOS ids, like the gating and transformers
        return generate(model, experts, prompts, max_tokens, SamplingParams())
