"""The placement service's Prometheus registry: the published plan's epoch, the expert balancedness of
the statistics window over what the live hosts hold, and the load it plans with (each node's batch
and step rate, the dense and expert times: services/placement/load.py), read when scraped; and its
NATS connection (node label `hub`: it connects to the hub)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry

from services.placement.balance import balancedness, holdings
from services.placement.load import first_host_speeds
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
    measured = service.load.measured(list(range(len(service.nodes))),
                                     speeds=first_host_speeds(live, service.nodes))
    seconds = {"dense_layer": measured.dense_time_s, "expert_call": measured.expert_time_s}
    rates = measured.step_rate if measured.step_rate is not None else np.zeros(len(service.nodes))
    return PlacementSample(
        int((service.plan or {}).get("epoch", 0)), balancedness(calls, hosts),
        batch={n: float(b) for n, b, r in zip(service.nodes, measured.batch, rates, strict=True) if r > 0},
        step_rate={n: float(r) for n, r in zip(service.nodes, rates, strict=True) if r > 0},
        seconds={kind: t for kind, t in seconds.items() if t is not None},
        link_rtt={node: 2 * link.shape().delay_s for node, link in service.links.items()},
        link_rate={node: link.shape().rate_Bps or math.inf for node, link in service.links.items()},
    )
