"""The placement service's and the migrator's /metrics over real HTTP, on a real hub.

Placement: the published epoch is the plan in KV, and the balancedness is vLLM's mean-over-max host
load of the activation reports it received, on the hosts their heartbeats describe. Migrator: the
steps it counts are the steps of the epoch it announced; a refused load counts as failed, and the
applied epoch stays where it was.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import nats
import numpy as np
import pytest

from services.migrator.service import build as build_migrator
from services.migrator.settings import MigratorSettings
from services.placement.metrics import placement_registry
from services.placement.service import build as build_placement
from services.placement.settings import PlacementSettings
from shared import subjects
from shared.activations import ActivationReport, StepLoad
from shared.metrics_http import MetricsServer
from shared.model.checkpoint import load_config
from shared.nats_server import NatsServer
from shared.schemas import HostStatus
from shared.topology import NodeLink
from shared.weights import WeightsStore
from tests.metrics.scrape import scrape
from tests.serving.conftest import LocalCluster


def heartbeat(host: str, node: str, experts: list[tuple[int, int]], limit: int) -> bytes:
    return HostStatus(host=host, node=node, device="cpu", memory_used_bytes=0, memory_limit_bytes=limit,
                      experts=experts, queue_depth=0, calls_served=0, tokens_served=0, errors=0
                      ).model_dump_json().encode()


async def test_placement_exports_the_published_epoch_and_the_balancedness_of_its_window(
    nats_hub: NatsServer, metrics_model: Path, unique: str
) -> None:
    n0, n1 = f"{unique}-n0", f"{unique}-n1"
    settings = PlacementSettings(nodes=f"{n0},{n1}", model=metrics_model, plans_bucket=f"{unique}-plans",
                                 hosts_bucket=f"{unique}-hosts", plan_interval_s=3600,
                                 links=[NodeLink(node=n0, delay_ms=2.5)])
    nc = await nats.connect(nats_hub.cfg.client_url())
    service = await build_placement(nc, settings)
    server = MetricsServer(placement_registry(service))
    port = await server.start()
    await service.start()
    try:
        m = await scrape(port)
        assert m.value("prism_plan_epoch", stage="published") == 0
        assert "prism_expert_balancedness" in m.families
        # no service of n0 or n1 answers the probes: n0's configured link, n1 half the default 4 ms node-to-node
        assert m.value("prism_planned_link_rtt_seconds", node=n0) == pytest.approx(0.005)
        assert m.value("prism_planned_link_rtt_seconds", node=n1) == pytest.approx(0.002)
        assert m.value("prism_planned_link_rate_bytes_per_second", node=n0) == math.inf  # configured: no limit
        assert m.value("prism_planned_link_rate_bytes_per_second", node=n1) == pytest.approx(500e6 / 8)  # the default
        assert not [name for name, _ in m.samples if name == "prism_expert_balancedness"], "no load yet: no sample"
        limit = 16 * load_config(metrics_model).expert_nbytes("float32")
        half = [(layer, e) for layer in (0, 1) for e in range(4)]
        other = [(layer, e) for layer in (0, 1) for e in range(4, 8)]
        await nc.publish(subjects.host_status(f"{unique}-h0"), heartbeat(f"{unique}-h0", n0, half, limit))
        await nc.publish(subjects.host_status(f"{unique}-h1"), heartbeat(f"{unique}-h1", n1, other, limit))
        # n0 sends 128 calls per layer to expert 0 (held by h0), n1 64 to expert 7 (held by h1)
        for node, expert, calls in ((n0, 0, 128), (n1, 7, 64)):
            counts = np.zeros((2, 8), dtype=np.int64)
            counts[:, expert] = calls
            steps = StepLoad(steps=calls // 8, sequences=calls // 4, dense_s=0.001 * (calls // 8),
                             dense_layers=calls // 4)
            report = ActivationReport(node, 1.0, [0, 1], counts, np.full(2, calls // 2, dtype=np.int64), steps)
            await nc.publish(subjects.activations(node), report.encode())
        await nc.flush()
        async with asyncio.timeout(10):
            while service.stats.window_tokens().sum() < 96 or service.plan is None:  # noqa: ASYNC110 - fed by NATS
                await asyncio.sleep(0.02)
        m = await scrape(port)
        # per layer: h0 carries 128, h1 64 → mean 96 over max 128, the same in both layers
        assert m.value("prism_expert_balancedness") == pytest.approx(0.75)
        entry = await service.plans.get("plan")
        assert m.value("prism_plan_epoch", stage="published") == json.loads(entry.value or b"{}")["epoch"] >= 1
        assert m.value("prism_network_bytes_total", node="hub", direction="in") > 0
        # the load it plans with: 16 and 8 steps of 2 sequences, 1 ms of dense compute per step over 2 layers
        assert m.value("prism_planned_batch", node=n0) == m.value("prism_planned_batch", node=n1) == 2
        assert m.value("prism_planned_steps_per_second", node=n0) == pytest.approx(
            2 * m.value("prism_planned_steps_per_second", node=n1), rel=0.05)
        assert m.value("prism_planned_seconds", kind="dense_layer") == pytest.approx(0.0005)
        assert not [labels for name, labels in m.samples if name == "prism_planned_seconds"
                    and dict(labels).get("kind") == "expert_call"], "no host counted a call: no expert time"
    finally:
        await service.stop()
        await server.close()
        await nc.close()


async def test_migrator_counts_the_steps_it_announced_and_a_refused_load_as_failed(
    cluster: LocalCluster, metrics_model: Path, unique: str
) -> None:
    hub = await nats.connect(cluster.hub.cfg.client_url())
    settings = MigratorSettings(model=metrics_model, model_id=unique, plans_bucket=f"{unique}-plans",
                                weights_bucket=f"{unique}-weights", command_timeout_s=10)
    migrator = await build_migrator(hub, settings)
    await migrator.upload_weights()
    server = MetricsServer(migrator.registry)
    port = await server.start()
    events = await hub.subscribe(subjects.PLAN_EVENTS)
    try:
        await cluster.add_node("a")
        store = {"model_id": unique, "weights_bucket": f"{unique}-weights"}
        a0 = await cluster.add_host("a", "a0", metrics_model, "*:*", **store)
        a1 = await cluster.add_host("a", "a1", metrics_model, "", **store)
        a2 = await cluster.add_host("a", "a2", metrics_model, "", model_id=unique, weights_bucket=f"{unique}-none")
        a1.store = await WeightsStore.open(a1.nc.jetstream(domain="hub"), f"{unique}-weights")
        keys = sorted(a0.weights)
        names = (a0.settings.host, a1.settings.host, a2.settings.host)
        plan = {"epoch": 1, "hosts": {names[0]: [list(k) for k in keys[:8]], names[1]: [list(k) for k in keys[8:]],
                                      names[2]: []}}
        assert await migrator.apply(plan) is True
        applied = json.loads((await events.next_msg(timeout=10)).data)
        m = await scrape(port)
        ok_steps = m.total("prism_migration_steps_total", result="ok")
        assert ok_steps == applied["steps"] >= 2
        assert m.value("prism_migration_steps_total", kind="load", result="ok") >= 1
        assert m.value("prism_migration_steps_total", kind="unload", result="ok") >= 1
        assert m.total("prism_migration_steps_total", result="failed") == 0
        assert m.value("prism_plan_epoch", stage="applied") == 1
        assert m.value("prism_migration_seconds_count", result="ok") == 1
        # a2 has no weights store: its load is refused, the epoch fails, nothing more is applied
        plan2 = {"epoch": 2, "hosts": {names[0]: [list(k) for k in keys[:8]], names[1]: [list(k) for k in keys[8:]],
                                       names[2]: [list(keys[0])]}}
        assert await migrator.apply(plan2) is False
        m = await scrape(port)
        assert m.value("prism_migration_steps_total", kind="load", result="failed") == 1
        assert m.total("prism_migration_steps_total", result="ok") == ok_steps
        assert m.value("prism_plan_epoch", stage="applied") == 1
        assert m.value("prism_migration_seconds_count", result="failed") == 1
    finally:
        await server.close()
        await hub.close()
