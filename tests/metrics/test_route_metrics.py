"""Route metrics over real HTTP against a known run on real NATS: node a's requests run their second
layer on node b (route a → b → a, one chain per step), so a sends one hop per step and b runs one segment
per step; the seconds must agree with the replies' timings, and b's foreign KV with its requests' lives."""

from __future__ import annotations

import asyncio
import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NatsClient

from shared import subjects
from shared.metrics_http import MetricsServer
from tests.metrics.scrape import Scrape, scrape
from tests.serving.conftest import LocalCluster

PROMPTS = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]


async def ask(nc: NatsClient, node: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = json.dumps({"input_ids": prompt, "max_tokens": max_tokens}).encode()
    reply: dict[str, Any] = json.loads((await nc.request(subjects.infer(node), body, timeout=30)).data)
    assert "error" not in reply, reply
    return reply


async def until_foreign_kv(port: int, node: str, held: bool) -> Scrape:
    """A scrape of `node` once it holds foreign KV (`held`), or none any more."""
    async with asyncio.timeout(10):
        while bool((now := await scrape(port)).value("prism_foreign_kv_slots", node=node)) != held:  # noqa: ASYNC110 - a real scrape
            await asyncio.sleep(0.01)
    return now


async def test_hops_segments_their_seconds_and_foreign_kv_follow_the_steps(
    cluster: LocalCluster, metrics_model: Path
) -> None:
    await cluster.add_node("a")
    await cluster.add_node("b")
    a, b = cluster.node("a"), cluster.node("b")
    ga = await cluster.add_gating("a", metrics_model, embedded={"ae": "0:*"}, route=[a, b])
    gb = await cluster.add_gating("b", metrics_model, embedded={"be": "1:*"}, route=[b, b])
    await cluster.settle()
    nc = await cluster.connect("a")
    async with AsyncExitStack() as stack:
        ports = {}
        for name, gating in (("a", ga), ("b", gb)):
            server = MetricsServer(gating.registry)
            ports[name] = await server.start()
            stack.push_async_callback(server.close)
        before = {name: await scrape(port) for name, port in ports.items()}
        # one request at a time: each step carries one sequence, so one hop and one segment
        replies = [await ask(nc, a, prompt, 3 + i) for i, prompt in enumerate(PROMPTS)]
        long = asyncio.create_task(ask(nc, a, [41, 42], 200))
        await until_foreign_kv(ports["b"], b, held=True)  # b keeps the running request's KV of layer 1
        replies.append(await long)
        after = {"b": await until_foreign_kv(ports["b"], b, held=False), "a": await scrape(ports["a"])}

    def delta(target: str, name: str) -> float:
        node = {"a": a, "b": b}[target]
        return after[target].total(name, node=node) - before[target].total(name, node=node)

    steps = sum(len(r["token_ids"]) for r in replies)  # the prefill and each decode step: one chain to b
    assert delta("a", "prism_route_hops_total") == steps
    assert delta("b", "prism_segments_total") == steps
    assert delta("b", "prism_route_hops_total") == delta("a", "prism_segments_total") == 0
    hop_s, segment_s = delta("a", "prism_route_hop_seconds_total"), delta("b", "prism_segment_seconds_total")
    assert 0 < segment_s < hop_s <= sum(r["timings"]["hop_wait_s"] for r in replies)  # b's passes ran in a's waits
    assert after["a"].value("prism_foreign_kv_slots", node=a) == 0
