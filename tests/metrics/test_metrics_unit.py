"""The metric definitions, vLLM's balancedness, and the /metrics HTTP server (real sockets)."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.placement.balance import balancedness, holdings, host_load
from shared.metrics import (
    SPECS,
    ConnectionCollector,
    GatingCollector,
    GatingSample,
    HostsCollector,
    MigrationMetrics,
    RequestMetrics,
)
from shared.metrics_http import MetricsServer, serve_metrics
from shared.schemas import HostStatus
from tests.metrics.scrape import http_get, parse, scrape

BOUNDED_LABELS = {"node", "host", "locality", "direction", "kind", "result", "stage"}


def test_every_metric_follows_the_naming_rules() -> None:
    names = [spec.name for spec in SPECS]
    assert len(names) == len(set(names))
    for spec in SPECS:
        assert re.fullmatch(r"prism_[a-z_]+", spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds"), spec.name
            assert spec.buckets == tuple(sorted(spec.buckets)), spec.name
        assert set(spec.labels) <= BOUNDED_LABELS, spec.name
        assert spec.help, spec.name


def test_the_issue_s_metrics_are_defined_with_their_labels() -> None:
    specs = {spec.name: spec for spec in SPECS}
    required = {
        "prism_request_seconds": ("node",), "prism_time_to_first_token_seconds": ("node",),
        "prism_time_per_output_token_seconds": ("node",), "prism_tokens_total": ("node", "kind"),
        "prism_expert_calls_total": ("node", "locality"), "prism_network_bytes_total": ("node", "direction"),
        "prism_queue_depth": ("node",), "prism_host_memory_bytes": ("host", "kind"), "prism_plan_epoch": ("stage",),
        "prism_migration_steps_total": ("kind", "result"), "prism_migration_seconds": ("result",),
        "prism_expert_balancedness": (),
    }
    for name, labels in required.items():
        assert specs[name].labels == labels, name


def test_balancedness_is_mean_over_max_host_load_per_layer() -> None:
    # 2 layers, 4 experts; host 0 holds experts 0-1, host 1 holds 2-3, expert 3 also on host 0 (2 holders).
    hosts = np.zeros((2, 2, 4), dtype=bool)
    hosts[0, :, [0, 1, 3]] = True
    hosts[1, :, [2, 3]] = True
    calls = np.array([[10.0, 0.0, 0.0, 0.0],  # layer 0: all on host 0 → loads 10, 0
                      [0.0, 0.0, 4.0, 8.0]])  # layer 1: expert 3 split 4/4 → loads 4, 8
    np.testing.assert_allclose(host_load(calls, hosts), [[10.0, 4.0], [0.0, 8.0]])
    # vLLM: sum over layers of the mean (5 + 6) over sum over layers of the max (10 + 8)
    assert balancedness(calls, hosts) == pytest.approx(11 / 18)
    assert balancedness(np.ones((2, 4)), holdings([[(1, e) for e in range(4)]] * 2, [1, 3], 4)) == 1.0
    assert balancedness(np.zeros((2, 4)), hosts) is None
    assert balancedness(calls, np.zeros((0, 2, 4), dtype=bool)) is None


def test_holdings_map_absolute_layers_to_rows_and_drop_others() -> None:
    out = holdings([[(3, 1), (5, 0)], [(4, 2), (3, 9)]], moe_layers=[3, 5], num_experts=4)
    assert out.shape == (2, 2, 4)
    assert {tuple(i) for i in np.argwhere(out)} == {(0, 0, 1), (0, 1, 0)}


def status(host: str, **kw: int) -> HostStatus:
    base = {"node": "n", "device": "cpu", "memory_used_bytes": 0, "memory_limit_bytes": 0, "experts": [],
            "queue_depth": 0, "calls_served": 0, "tokens_served": 0, "errors": 0}
    return HostStatus(host=host, **{**base, **kw})  # type: ignore[arg-type]


async def test_a_registry_is_served_and_parsed_with_every_collector() -> None:
    registry = CollectorRegistry()
    requests = RequestMetrics(registry, "n1")
    requests.finished("length", prompt_tokens=5, generated_tokens=4, first_token_s=0.2, total_s=0.5)
    requests.finished("stop", prompt_tokens=3, generated_tokens=1, first_token_s=0.1, total_s=0.1)
    requests.failed("invalid_json")
    registry.register(GatingCollector(lambda: GatingSample("n1", 2, 3, 7, 11, 5)))
    registry.register(HostsCollector(lambda: [status("h1", memory_used_bytes=10, memory_limit_bytes=40,
                                                     calls_served=6, direct_calls=2, experts=[(0, 1)])]))
    registry.register(ConnectionCollector("n1", lambda: {"in_bytes": 100, "out_bytes": 50}))
    migration = MigrationMetrics(registry)
    migration.step("load", ok=True)
    migration.epoch(4, ok=True, seconds=1.5)
    migration.epoch(5, ok=False, seconds=0.5)
    server = MetricsServer(registry)
    port = await server.start()
    try:
        m = await scrape(port)
    finally:
        await server.close()
    assert m.value("prism_requests_total", node="n1", result="length") == 1
    assert m.value("prism_requests_total", node="n1", result="invalid_json") == 1
    assert m.value("prism_tokens_total", node="n1", kind="prompt") == 8
    assert m.value("prism_tokens_total", node="n1", kind="generated") == 5
    assert m.value("prism_request_seconds_count", node="n1") == 2
    assert m.value("prism_request_seconds_sum", node="n1") == pytest.approx(0.6)
    assert m.value("prism_time_per_output_token_seconds_count", node="n1") == 1  # only the 4-token one
    assert m.value("prism_time_per_output_token_seconds_sum", node="n1") == pytest.approx(0.1)
    assert (m.value("prism_queue_depth", node="n1"), m.value("prism_running_requests", node="n1")) == (2, 3)
    assert m.value("prism_expert_calls_total", node="n1", locality="local") == 7
    assert m.value("prism_expert_calls_total", node="n1", locality="remote") == 11
    assert m.value("prism_host_memory_bytes", host="h1", kind="used") == 10
    assert m.value("prism_host_calls_total", host="h1", kind="direct") == 2
    assert m.value("prism_network_bytes_total", node="n1", direction="in") == 100
    assert m.value("prism_plan_epoch", stage="applied") == 4  # the failed epoch 5 was not applied
    assert m.value("prism_migration_seconds_count", result="failed") == 1
    assert m.families["prism_request_seconds"] == "histogram"
    assert not [name for name in m.families if name.endswith("_created")]


async def test_the_server_answers_only_metrics_and_survives_garbage() -> None:
    server = MetricsServer(CollectorRegistry())
    port = await server.start()
    try:
        assert (await http_get(port, "/"))[0] == 404
        assert (await http_get(port, "/metrics", method="POST"))[0] == 405
        status, body = await http_get(port, "/metrics?x=1", method="HEAD")
        assert (status, body) == (200, b"")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x00garbage without a request line\r\n\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no answer
        writer.close()
        assert (await http_get(port))[0] == 200  # still serving
    finally:
        await server.close()


async def test_port_zero_is_off_and_the_default_bind_is_loopback() -> None:
    registry = CollectorRegistry()
    async with serve_metrics(registry, "127.0.0.1", 0, "test") as port:
        assert port is None
    server = MetricsServer(registry)
    await server.start()
    try:
        assert server._server is not None
        assert {s.getsockname()[0] for s in server._server.sockets} == {"127.0.0.1"}
    finally:
        await server.close()


async def test_a_collector_that_fails_costs_one_scrape_not_the_server() -> None:
    calls = []

    def read() -> GatingSample:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return GatingSample("n", 0, 0, 0, 0, 0)

    registry = CollectorRegistry()
    registry.register(GatingCollector(read))
    server = MetricsServer(registry)
    port = await server.start()
    try:
        assert (await http_get(port))[0] == 500
        assert parse((await http_get(port))[1].decode()).value("prism_queue_depth", node="n") == 0
    finally:
        await server.close()


def test_the_readme_lists_every_metric() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Metrics"):readme.index("## Benchmarks")]
    missing = [spec.name for spec in SPECS if f"`{spec.name}`" not in section]
    assert not missing


def test_every_service_has_metrics_off_on_loopback_by_default_and_bounded() -> None:
    from pydantic import ValidationError

    from services.expert_host.settings import ExpertHostSettings
    from services.gating.settings import GatingSettings
    from services.migrator.settings import MigratorSettings
    from services.placement.settings import PlacementSettings

    for cls in (GatingSettings, ExpertHostSettings, PlacementSettings, MigratorSettings):
        settings = cls()
        assert (settings.metrics_port, settings.metrics_bind) == (0, "127.0.0.1"), cls.__name__
        assert cls(metrics_port=9464).metrics_port == 9464
        with pytest.raises(ValidationError, match="metrics_port"):
            cls(metrics_port=65536)
