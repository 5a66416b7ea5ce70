"""Gating and expert-host /metrics over real HTTP, against what a known run did on real NATS.

Node a: embedded host ae (experts 0-2 of every layer) and process host a1 (3-5); node b: embedded
host be (6-7). Each expert has one holder, so where every call goes is known: the counters of the
gatings must move by exactly what the hosts counted (their `status` command), the tokens by the
replies' usage, the latency histograms by the replies' timings.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from services.expert_host.metrics import host_registry
from services.gating.service import Gating
from shared import subjects
from shared.metrics_http import MetricsServer
from shared.schemas import HostStatus
from tests.metrics.scrape import Scrape, scrape
from tests.serving.conftest import LocalCluster

PROMPTS = [[11, 12, 13, 14], [21, 22], [31, 32, 33, 34, 35, 36]]


async def until_routes_known(gatings: list[Gating], layers: list[int], experts: int) -> None:
    """Until every gating's host directory names a live holder for every expert (heartbeats arrived):
    then a call to a host of the gating's own node is sent to that host, and counts as local."""
    async with asyncio.timeout(15):
        while any(  # noqa: ASYNC110 - the directories are fed by real heartbeats
            g.directory is None or g.directory.route(layer, list(range(experts)))[1]
            for g in gatings for layer in layers
        ):
            await asyncio.sleep(0.05)


async def statuses(nc: NatsClient, hosts: list[str]) -> dict[str, HostStatus]:
    """What each host counted, from its status command."""
    out = {}
    for host in hosts:
        msg = await nc.request(subjects.host_cmd(host), b'{"kind": "status"}', timeout=5)
        out[host] = HostStatus.model_validate_json(msg.data)
    return out


async def serve(stack: AsyncExitStack, registry: CollectorRegistry) -> int:
    server = MetricsServer(registry)
    port = await server.start()
    stack.push_async_callback(server.close)
    return port


async def ask_many(nc: NatsClient, node: str, prompts: list[list[int]]) -> list[dict[str, Any]]:
    async def one(prompt: list[int], max_tokens: int) -> dict[str, Any]:
        body = json.dumps({"input_ids": prompt, "max_tokens": max_tokens}).encode()
        return json.loads((await nc.request(subjects.infer(node), body, timeout=60)).data)

    async with asyncio.timeout(90):
        return list(await asyncio.gather(*(one(p, 3 + i) for i, p in enumerate(prompts))))


class Run:
    """Scrapes and host statuses before and after one node's requests."""

    def __init__(self, ports: dict[str, int], nc: NatsClient, hosts: list[str]) -> None:
        self.ports, self.nc, self.hosts = ports, nc, hosts
        self.before: dict[str, Scrape] = {}
        self.after: dict[str, Scrape] = {}

    async def snapshot(self) -> tuple[dict[str, Scrape], dict[str, HostStatus]]:
        return {name: await scrape(port) for name, port in self.ports.items()}, await statuses(self.nc, self.hosts)

    def delta(self, target: str, name: str, **labels: str) -> float:
        return self.after[target].total(name, **labels) - self.before[target].total(name, **labels)


@pytest.fixture
async def mixed(cluster: LocalCluster, metrics_model: Path) -> AsyncIterator[dict[str, Any]]:
    await cluster.add_node("a")
    await cluster.add_node("b")
    a1 = await cluster.add_host("a", "a1", metrics_model, "*:3-5")
    ga = await cluster.add_gating("a", metrics_model, embedded={"ae": "*:0-2"})
    gb = await cluster.add_gating("b", metrics_model, embedded={"be": "*:6-7"})
    await cluster.settle()
    await until_routes_known([ga, gb], layers=[0, 1], experts=8)
    async with AsyncExitStack() as stack:
        ports = {"a": await serve(stack, ga.registry), "b": await serve(stack, gb.registry),
                 "a1": await serve(stack, host_registry(a1))}
        yield {"ports": ports, "a1": a1, "ae": cluster.embedded("a", "ae"), "be": cluster.embedded("b", "be")}


async def run_on(cluster: LocalCluster, mixed: dict[str, Any], node: str) -> tuple[Run, list[dict], dict, dict]:
    """Node `node`'s requests (three good ones, two bad), between two snapshots; (run, replies, host deltas
    of calls_served and direct_calls, client byte deltas)."""
    nc = await cluster.connect(node)
    names = {key: mixed[key].settings.host for key in ("ae", "a1", "be")}
    run = Run(mixed["ports"], nc, list(names.values()))
    run.before, hosts_before = await run.snapshot()
    sent, received = nc.stats["out_bytes"], nc.stats["in_bytes"]
    replies = await ask_many(nc, cluster.node(node), PROMPTS)
    for bad in (b"{", b'{"input_ids": [1], "max_tokens": 0}'):
        await nc.request(subjects.infer(cluster.node(node)), bad, timeout=10)
    client = {"out": nc.stats["out_bytes"] - sent, "in": nc.stats["in_bytes"] - received}
    run.after, hosts_after = await run.snapshot()
    served = {key: hosts_after[n].calls_served - hosts_before[n].calls_served for key, n in names.items()}
    direct = {key: hosts_after[n].direct_calls - hosts_before[n].direct_calls for key, n in names.items()}
    assert all("error" not in r for r in replies), replies
    return run, replies, {"served": served, "direct": direct, "status": hosts_after}, client


def check_requests(run: Run, target: str, node: str, replies: list[dict], client: dict[str, int]) -> None:
    """Tokens, results, histograms and bytes of one node's run against its replies."""
    usage = [r["usage"] for r in replies]
    assert run.delta(target, "prism_tokens_total", node=node, kind="prompt") == sum(u["prompt_tokens"] for u in usage)
    generated = sum(u["completion_tokens"] for u in usage)
    assert run.delta(target, "prism_tokens_total", node=node, kind="generated") == generated
    for reason in {r["finish_reason"] for r in replies}:
        want = sum(r["finish_reason"] == reason for r in replies)
        assert run.delta(target, "prism_requests_total", node=node, result=reason) == want
    assert run.delta(target, "prism_requests_total", node=node, result="invalid_json") == 1
    assert run.delta(target, "prism_requests_total", node=node, result="invalid_request") == 1
    timings = [r["timings"] for r in replies]
    assert run.delta(target, "prism_request_seconds_count", node=node) == len(replies)
    assert run.delta(target, "prism_request_seconds_sum", node=node) == pytest.approx(
        sum(t["total_s"] for t in timings), abs=1e-6)
    assert run.delta(target, "prism_time_to_first_token_seconds_sum", node=node) == pytest.approx(
        sum(t["queue_s"] + t["prefill_s"] for t in timings), abs=1e-6)
    per_token = [t["decode_s"] / (len(r["token_ids"]) - 1) for r, t in zip(replies, timings, strict=True)
                 if len(r["token_ids"]) >= 2]
    assert run.delta(target, "prism_time_per_output_token_seconds_count", node=node) == len(per_token)
    assert run.delta(target, "prism_time_per_output_token_seconds_sum", node=node) == pytest.approx(
        sum(per_token), abs=1e-6)
    # what the client sent reached the gating's connection, and what it received came from it
    assert run.delta(target, "prism_network_bytes_total", node=node, direction="in") >= client["out"] > 0
    assert run.delta(target, "prism_network_bytes_total", node=node, direction="out") >= client["in"] > 0
    assert run.after[target].value("prism_queue_depth", node=node) == 0
    assert run.after[target].value("prism_running_requests", node=node) == 0


async def test_node_a_local_and_remote_calls_equal_what_the_hosts_counted(
    cluster: LocalCluster, mixed: dict[str, Any]
) -> None:
    run, replies, hosts, client = await run_on(cluster, mixed, "a")
    a, b = cluster.node("a"), cluster.node("b")
    served, direct = hosts["served"], hosts["direct"]
    assert direct["ae"] > 0
    assert served["a1"] > 0
    assert served["be"] > 0
    local = run.delta("a", "prism_expert_calls_total", node=a, locality="local")
    remote = run.delta("a", "prism_expert_calls_total", node=a, locality="remote")
    assert local == direct["ae"] + served["a1"], "embedded and own-node host calls are local"
    assert remote == served["be"], "calls to node b's host are remote"
    assert served["ae"] == direct["be"] == 0
    assert run.delta("b", "prism_expert_calls_total", node=b) == 0
    check_requests(run, "a", a, replies, client)
    # host metrics: the embedded host in its gating's /metrics, the process host in its own, as they counted
    status = hosts["status"]
    for target, key, experts in (("a", "ae", 6), ("a1", "a1", 6), ("b", "be", 4)):  # experts × 2 layers
        host = mixed[key].settings.host
        m = run.after[target]
        assert m.value("prism_host_calls_total", host=host, kind="bus") == status[host].calls_served
        assert m.value("prism_host_calls_total", host=host, kind="direct") == status[host].direct_calls
        assert m.value("prism_host_memory_bytes", host=host, kind="used") == status[host].memory_used_bytes > 0
        assert m.value("prism_host_memory_bytes", host=host, kind="limit") == status[host].memory_limit_bytes
        assert m.value("prism_host_experts", host=host) == len(status[host].experts) == experts
    assert run.after["a"].label_values("prism_host_calls_total", "host") == {mixed["ae"].settings.host}
    assert run.after["b"].label_values("prism_host_calls_total", "host") == {mixed["be"].settings.host}


async def test_node_b_calls_to_node_a_s_hosts_are_remote(cluster: LocalCluster, mixed: dict[str, Any]) -> None:
    run, replies, hosts, client = await run_on(cluster, mixed, "b")
    a, b = cluster.node("a"), cluster.node("b")
    served, direct = hosts["served"], hosts["direct"]
    assert run.delta("b", "prism_expert_calls_total", node=b, locality="local") == direct["be"] > 0
    assert run.delta("b", "prism_expert_calls_total", node=b, locality="remote") == served["ae"] + served["a1"] > 0
    assert direct["ae"] == served["be"] == 0
    assert run.delta("a", "prism_expert_calls_total", node=a) == 0
    total_calls = sum(run.delta(t, "prism_expert_calls_total") for t in ("a", "b"))
    assert total_calls == sum(served.values()) + sum(direct.values())
    assert run.delta("b", "prism_expert_messages_total", node=b) > 0
    check_requests(run, "b", b, replies, client)
