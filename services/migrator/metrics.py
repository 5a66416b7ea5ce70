"""The migrator's Prometheus registry: load/unload commands by result, time per epoch, the applied
epoch (observed as they happen, see service.py) and its NATS connection (node label `hub`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry

from shared.metrics import ConnectionCollector, MigrationMetrics


def migrator_registry(connection_stats: Callable[[], Mapping[str, int]]) -> tuple[CollectorRegistry, MigrationMetrics]:
    registry = CollectorRegistry()
    metrics = MigrationMetrics(registry)
    registry.register(ConnectionCollector("hub", connection_stats))
    return registry, metrics
