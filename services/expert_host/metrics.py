"""A process expert host's Prometheus registry: the host's counters and memory (from its HostStatus,
read when scraped) and its NATS connection. An embedded host's metrics come from its gating's
registry instead (services/gating/metrics.py): one registry per process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from services.expert_host.service import ExpertHost
from shared.metrics import ConnectionCollector, HostsCollector


def host_registry(host: ExpertHost) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(HostsCollector(lambda: [host.status()]))
    registry.register(ConnectionCollector(host.settings.node, lambda: host.nc.stats))
    return registry
