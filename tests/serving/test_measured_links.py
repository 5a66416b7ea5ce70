"""The placement service measures each node's round trip to the hub, plans with it, and publishes it with
the plan; the gatings serve remote experts by the plan's links. Real leaf servers behind the link
emulator, real gatings and a real placement service."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from services.placement.link_probe import LinkProbe, links_moved
from services.placement.service import build
from services.placement.settings import PlacementSettings
from shared.linkemu import LinkEmulator, LinkShape
from shared.topology import LinkSpec, NodeLink
from tests.checkpoints import make_tiny_checkpoint
from tests.serving.conftest import LocalCluster

DELAY_S = 0.015  # node b's one-way delay to the hub
RATE_MBIT = 10.0  # node b's rate, in the rate test (32 KiB: 26 ms)


def test_the_round_trip_is_the_smallest_of_the_recent_samples() -> None:
    probe = LinkProbe(["a", "b"], window=3, min_samples=2)
    for sample in (0.010, 0.004, 0.020, 0.030, 0.025):  # 0.004 has left the window of 3
        probe.add("a", sample)
    probe.add("b", 0.001)  # one sample is not a measurement yet
    probe.add("stranger", 0.001)  # not a node of the plan: ignored
    assert probe.rtt_s() == {"a": 0.020}
    configured = {"a": LinkSpec(delay_ms=1.0, rate_mbit=100.0), "b": LinkSpec(delay_ms=3.0)}
    assert probe.links(configured) == {"a": LinkSpec(delay_ms=10.0, rate_mbit=100.0), "b": configured["b"]}


def test_the_rate_is_the_payload_over_its_extra_time() -> None:
    probe = LinkProbe(["a", "b", "c"], window=10, min_samples=1, rate_bytes=125_000)  # 1 Mbit: 2 loaded needed
    assert [probe.loaded(i) for i in range(6)] == [False, False, False, False, True, False]
    assert not LinkProbe(["a"], rate_bytes=0).loaded(4)  # rates not measured
    for node, empty, loaded in (("a", 0.010, 0.030), ("b", 0.010, 0.0100001), ("c", 0.010, 0.009)):
        for extra in (0.0, 0.004):  # of fewer than 11 samples, the smallest of each kind count
            probe.add(node, empty + extra)
            probe.add(node, loaded + extra, loaded=True)
    assert probe.rate_mbit() == {"a": 50.0, "b": None, "c": None}  # 1 Mbit in 20 ms; b and c: no limit seen
    links = probe.links({n: LinkSpec(delay_ms=1.0, rate_mbit=10.0) for n in "abc"})
    assert links["a"] == LinkSpec(delay_ms=5.0, rate_mbit=50.0)
    assert links["c"].rate_mbit is None
    # moved: the time the payload takes changed by more than 20% and 0.1 ms (1 Mbit: 20 ms at 50 Mbit/s)
    assert links_moved({"a": LinkSpec(delay_ms=5.0, rate_mbit=45.0)}, {"a": links["a"]}, 125_000) is False
    assert links_moved({"a": LinkSpec(delay_ms=5.0, rate_mbit=30.0)}, {"a": links["a"]}, 125_000) is True
    assert links_moved({"c": LinkSpec(delay_ms=5.0, rate_mbit=1e5)}, {"c": links["c"]}, 125_000) is False
    fast = {"c": LinkSpec(delay_ms=5.0, rate_mbit=1000.0)}  # 1 ms for the payload; at 2000 Mbit/s 0.5 ms: noise
    assert links_moved(fast, {"c": LinkSpec(delay_ms=5.0, rate_mbit=2000.0)}, 125_000) is False
    # of more samples, the 10th percentile of each kind: one lucky empty probe does not move the rate
    probe = LinkProbe(["a"], window=40, min_samples=2, rate_bytes=125_000)
    for sample in [0.001] + [0.010] * 19:
        probe.add("a", sample)
    for _ in range(5):
        probe.add("a", 0.030, loaded=True)
    assert (probe.rtt_s(), probe.rate_mbit()) == ({"a": 0.001}, {"a": 50.0})


async def test_the_placement_service_measures_each_nodes_rate(
    cluster: LocalCluster, tmp_path: Path, unique: str
) -> None:
    """Node b's link carries 10 Mbit/s (configured: 200), node a's has no limit (configured: 10 Mbit/s):
    the published rates are b's within 30% and a's far higher, and a restart keeps them. b's round trip
    makes nats-server compress its leaf connection, which a payload of zeros would cross in no time."""
    model = make_tiny_checkpoint("mixtral", tmp_path / "m", seed=3, num_hidden_layers=2)
    a, b = cluster.node("a"), cluster.node("b")
    shape = LinkShape.from_ms_mbit(6.0, RATE_MBIT)  # over 10 ms round trips: nats-server compresses the leaf link
    async with LinkEmulator("127.0.0.1", cluster.hub.cfg.leaf_port or 0, shape) as link:
        await cluster.add_node("a")
        await cluster.add_node("b", leaf_url=f"nats://127.0.0.1:{link.port}")
        for node in "ab":
            await cluster.add_gating(node, model, embedded={f"{node}e": "*:*"}, plans_bucket=f"{unique}-plans")
        configured = [NodeLink(node=a, delay_ms=0.0, rate_mbit=10.0), NodeLink(node=b, delay_ms=6.0, rate_mbit=200.0)]
        settings = PlacementSettings(nodes=f"{a},{b}", model=model, links=configured, link_probe_s=0.05,
                                     plans_bucket=f"{unique}-plans", hosts_bucket=f"{unique}-hosts",
                                     min_window_tokens=0)
        nc = await nats.connect(cluster.hub.cfg.client_url())
        service = await build(nc, settings)
        await service.start()
        try:
            async with asyncio.timeout(30):
                while service.links[b].rate_mbit == 200.0 or service.links[a].rate_mbit == 10.0:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            rates = {link["node"]: link["rate_mbit"] for link in json.loads((await service.plans.get("links")).value)}
            assert rates[b] == pytest.approx(RATE_MBIT, rel=0.3), rates
            assert rates[a] is None or rates[a] > 4 * RATE_MBIT, rates  # loopback: what moving 32 KiB costs
            await service.stop()
            again = await build(nc, settings.model_copy(update={"link_probe_s": 3600.0}))
            await again.start()
            await again.stop()
            assert again.links[b].rate_mbit == rates[b]
        finally:
            await service.stop()
            await nc.close()


async def test_plans_carry_the_measured_links_and_the_gatings_serve_by_them(
    cluster: LocalCluster, tmp_path: Path, unique: str
) -> None:
    """Nodes a (direct) and b (15 ms one way) are configured the other way round; the published links
    have b farther than a by at least the emulated delay, and the configured rates; the placement service
    plans with them and each gating's host directory serves by them."""
    model = make_tiny_checkpoint("mixtral", tmp_path / "m", seed=3, num_hidden_layers=2)
    a, b, gone = cluster.node("a"), cluster.node("b"), cluster.node("gone")
    async with LinkEmulator("127.0.0.1", cluster.hub.cfg.leaf_port or 0, LinkShape(delay_s=DELAY_S)) as link:
        await cluster.add_node("a")
        await cluster.add_node("b", leaf_url=f"nats://127.0.0.1:{link.port}")
        for node in "ab":
            await cluster.add_gating(node, model, embedded={f"{node}e": "*:*"}, plans_bucket=f"{unique}-plans",
                                     links=[NodeLink(node=a, delay_ms=20.0), NodeLink(node=b, delay_ms=0.0)])
        configured = [NodeLink(node=n, delay_ms=d, rate_mbit=r) for n, d, r in ((a, 20.0, 100.0), (b, 0.0, 50.0),
                                                                               (gone, 3.0, None))]
        settings = PlacementSettings(nodes=f"{a},{b},{gone}", model=model, links=configured, link_probe_s=0.05,
                                     plans_bucket=f"{unique}-plans", hosts_bucket=f"{unique}-hosts",
                                     min_window_tokens=0, link_rate_bytes=0)
        nc = await nats.connect(cluster.hub.cfg.client_url())
        service = await build(nc, settings)
        await service.start()
        try:
            async with asyncio.timeout(20):
                while service.links[b].delay_ms < 1e3 * DELAY_S:  # noqa: ASYNC110 - set by the probes
                    await asyncio.sleep(0.05)
            published = json.loads((await service.plans.get("links")).value)
            links = {link["node"]: link for link in published}
            assert list(links) == [a, b, gone]
            assert links[b]["delay_ms"] - links[a]["delay_ms"] >= 1e3 * DELAY_S - 0.5, links
            assert links[b]["delay_ms"] < 1e3 * DELAY_S + 25, links  # a sample is the link and a little more
            assert [links[n]["rate_mbit"] for n in (a, b, gone)] == [100.0, 50.0, None]  # not measuring rates
            assert links[gone]["delay_ms"] == 3.0  # never answered: the configured link
            assert {n: link.model_dump() for n, link in service.links.items()} == {
                n: {k: v for k, v in link.items() if k != "node"} for n, link in links.items()}
            directories = [cluster.gatings[node].directory for node in "ab"]
            async with asyncio.timeout(10):  # the gatings' KV watches (the probes may publish again meanwhile)
                while any(d is None or [x.model_dump() for x in d.links] != published for d in directories):
                    await asyncio.sleep(0.02)
                    published = json.loads((await service.plans.get("links")).value)
            await service.stop()
            # a restart plans with what was measured before; with probing off, it publishes the configured links
            for probe_s, b_delay in ((3600.0, links[b]["delay_ms"]), (0.0, 0.0)):
                again = await build(nc, settings.model_copy(update={"link_probe_s": probe_s}))
                await again.start()
                await again.stop()
                assert again.links[b].delay_ms == b_delay
                restarted = json.loads((await again.plans.get("links")).value)
                assert restarted[1] == {"node": b, "delay_ms": b_delay, "rate_mbit": 50.0}
        finally:
            await service.stop()
            await nc.close()

