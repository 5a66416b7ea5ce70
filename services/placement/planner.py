"""From live hosts and activation statistics to a plan. Pure. (Whether a plan is worth a migration:
objectives.judge.)

Glossary: a *plan* is what the placement service publishes (epoch, host → experts); a *Placement* is
the policies' array form `[hosts, MoE layers, experts]`. Layers in a plan are absolute decoder layer
indices (the ones in expert subjects); in a Placement they are MoE-layer rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.placement.errors import InvalidInputError
from services.placement.types import Cluster, Placement
from shared.schemas import HostStatus
from shared.topology import LinkSpec, star_links


@dataclass(frozen=True)
class ClusterView:
    """The live cluster: policy input plus the names behind its indices."""

    cluster: Cluster
    nodes: list[str]
    hosts: list[str]


def cluster_view(
    statuses: Sequence[HostStatus], nodes: list[str], expert_bytes: int, links: Mapping[str, LinkSpec]
) -> ClusterView:
    """Hosts of known nodes, sorted by name, with slots = memory limit / expert size and the speed
    each reports (its topology's); links between nodes through the hub from each node's link to it."""
    live = sorted((s for s in statuses if s.node in nodes), key=lambda s: s.host)
    if not live:
        raise InvalidInputError(f"no live expert host on any of the nodes {nodes}")
    rtt_s, rate_Bps = star_links([links[node] for node in nodes])
    cluster = Cluster(
        host_node=np.array([nodes.index(s.node) for s in live]),
        host_slots=np.array([s.memory_limit_bytes // expert_bytes for s in live]),
        host_speed=np.array([s.speed for s in live]),
        rtt_s=np.array(rtt_s),
        bandwidth_Bps=np.array(rate_Bps),
    )
    return ClusterView(cluster, nodes, [s.host for s in live])


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



def to_plan_routes(
    routes: np.ndarray | None, view: ClusterView, moe_layers: list[int], num_layers: int
) -> dict[str, list[str]] | None:
    """home node name → executing node name per decoder layer (0..num_layers-1), or None (stay-home).

    routes [N, L_moe] over the view's nodes. A dense layer (no routed experts) runs where the layer
    before it ran, at home for leading dense layers, so it adds no hop."""
    if routes is None:
        return None
    row = {layer: i for i, layer in enumerate(moe_layers)}
    out: dict[str, list[str]] = {}
    for h, home in enumerate(view.nodes):
        names, at = [], home
        for layer in range(num_layers):
            if layer in row:
                at = view.nodes[int(routes[h, row[layer]])]
            names.append(at)
        out[home] = names
    return out


def from_plan_routes(
    plan_routes: dict[str, list[str]] | None, view: ClusterView, moe_layers: list[int]
) -> np.ndarray | None:
    """[N, L_moe] node indices over the view's nodes from a plan's routes; None when there are none
    or they name other nodes or layers than the view's (the next plan then starts from stay-home)."""
    if not plan_routes:
        return None
    index = {n: i for i, n in enumerate(view.nodes)}
    table = np.repeat(np.arange(len(view.nodes))[:, None], len(moe_layers), axis=1)
    for home, names in plan_routes.items():
        if home not in index or any(n not in index for n in names) or max(moe_layers, default=-1) >= len(names):
            return None
        table[index[home]] = [index[names[layer]] for layer in moe_layers]
    return table
