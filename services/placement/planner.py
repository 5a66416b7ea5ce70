"""From live hosts and activation statistics to a plan. Pure. (Whether a plan is worth a migration:
objectives.judge.)

Glossary: a *plan* is what the placement service publishes (epoch, host → experts); a *Placement* is
the policies' array form `[hosts, MoE layers, experts]`. Layers in a plan are absolute decoder layer
indices (the ones in expert subjects); in a Placement they are MoE-layer rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.placement.errors import InvalidInputError
from services.placement.types import Cluster, Placement
from shared.schemas import HostStatus


@dataclass(frozen=True)
class ClusterView:
    """The live cluster: policy input plus the names behind its indices."""

    cluster: Cluster
    nodes: list[str]
    hosts: list[str]


def cluster_view(
    statuses: Sequence[HostStatus], nodes: list[str], expert_bytes: int, rtt_s: float, bandwidth_bytes_s: float
) -> ClusterView:
    """Hosts of known nodes, sorted by name, with slots = memory limit / expert size."""
    live = sorted((s for s in statuses if s.node in nodes), key=lambda s: s.host)
    if not live:
        raise InvalidInputError(f"no live expert host on any of the nodes {nodes}")
    cluster = Cluster(
        host_node=np.array([nodes.index(s.node) for s in live]),
        host_slots=np.array([s.memory_limit_bytes // expert_bytes for s in live]),
        host_speed=np.ones(len(live)),
        rtt_s=_links(len(nodes), rtt_s, 0.0),
        bandwidth_Bps=_links(len(nodes), bandwidth_bytes_s, np.inf),
    )
    return ClusterView(cluster, nodes, [s.host for s in live])


def _links(n: int, value: float, diagonal: float) -> np.ndarray:
    m = np.full((n, n), value, dtype=np.float64)
    np.fill_diagonal(m, diagonal)
    return m


def to_plan_hosts(placement: Placement, view: ClusterView, moe_layers: list[int]) -> dict[str, list[list[int]]]:
    """host name → sorted [layer, expert] pairs (absolute layer indices)."""
    return {
        host: [[moe_layers[row], int(e)] for row, e in np.argwhere(placement.hosts[h])]
        for h, host in enumerate(view.hosts)
    }


def from_plan_hosts(
    plan_hosts: dict[str, list[list[int]]],
    view: ClusterView,
    moe_layers: list[int],
    num_experts: int,
    *,
    require_coverage: bool = False,
) -> Placement | None:
    """The Placement of host → experts on today's hosts; None if the hosts differ (or, with
    `require_coverage`, if some expert has no holder)."""
    if set(plan_hosts) != set(view.hosts):
        return None
    row = {layer: i for i, layer in enumerate(moe_layers)}
    hosts = np.zeros((len(view.hosts), len(moe_layers), num_experts), dtype=bool)
    for h, host in enumerate(view.hosts):
        for layer, expert in plan_hosts[host]:
            if layer in row and 0 <= expert < num_experts:
                hosts[h, row[layer], expert] = True
    if require_coverage and not hosts.any(axis=0).all():
        return None
    return Placement(hosts)

