"""A gating's Prometheus registry: its requests (observed as they finish, see service.py), its engine
and expert dispatch (read when scraped), its embedded expert hosts (their host metrics come from the
gating's /metrics) and its NATS connection. One registry per gating, never the global one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from services.gating.engine import Sequence
from shared.metrics import (
    ConnectionCollector,
    GatingCollector,
    GatingSample,
    HostsCollector,
    RequestMetrics,
)

if TYPE_CHECKING:
    from services.gating.service import Gating


def gating_registry(gating: Gating) -> tuple[CollectorRegistry, RequestMetrics]:
    """The registry to serve, and the request metrics the gating observes into."""
    registry = CollectorRegistry()
    requests = RequestMetrics(registry, gating.settings.node)
    registry.register(GatingCollector(lambda: sample(gating)))
    registry.register(HostsCollector(lambda: [host.status() for host in gating.hosts]))
    registry.register(ConnectionCollector(gating.settings.node, lambda: gating.nc.stats))
    return registry, requests


def sample(gating: Gating) -> GatingSample:
    """The gating's counters now. Expert calls sent over the bus to a host of this node count as local."""
    engine = gating.engine
    local = remote = messages = 0
    if gating.lockstep is not None:
        experts = gating.lockstep.experts
        local = experts.local_calls + experts.node_calls
        remote = experts.remote_calls - experts.node_calls
        messages = experts.messages
    hops, segments = gating.hops, gating.segments
    return GatingSample(
        gating.settings.node, len(engine.waiting), len(engine.active), local, remote, messages,
        hops=hops.sent if hops else 0, hop_s=hops.wait_s if hops else 0.0,
        segments=segments.runner.segments_run if segments else 0,
        segment_s=segments.runner.busy_s if segments else 0.0,
        foreign_kv=len(segments.runner.slots) if segments else 0,
    )


def observe_finished(metrics: RequestMetrics, seq: Sequence, finish_reason: str) -> None:
    """A sequence that finished without error, timed from its arrival at the gating."""
    metrics.finished(finish_reason, len(seq.prompt), len(seq.generated), seq.first_token - seq.arrived,
                     seq.finished - seq.arrived)
