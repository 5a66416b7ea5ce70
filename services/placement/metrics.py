"""The placement service's Prometheus registry: the published plan's epoch and the expert
balancedness of the statistics window over what the live hosts hold (read when scraped), and its
NATS connection (node label `hub`: it connects to the hub)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from services.placement.balance import balancedness, holdings
from shared.metrics import ConnectionCollector, PlacementCollector, PlacementSample

if TYPE_CHECKING:
    from services.placement.service import PlacementService


def placement_registry(service: PlacementService) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(PlacementCollector(lambda: sample(service)))
    registry.register(ConnectionCollector("hub", lambda: service.nc.stats))
    return registry


def sample(service: PlacementService) -> PlacementSample:
    """Balancedness of every node's windowed calls ([N, L, E] summed over nodes) on the live hosts."""
    live = service.live_hosts()
    hosts = holdings([s.experts for s in live], service.model.moe_layers, service.model.num_experts)
    calls = service.stats.counts().sum(axis=0)  # [L, E]
    return PlacementSample(int((service.plan or {}).get("epoch", 0)), balancedness(calls, hosts))
