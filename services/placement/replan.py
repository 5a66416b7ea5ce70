"""Replanning while serving: statistics in, a new placement out when the migration rule accepts it.

Used by the simulator as its controller; the placement service applies the same rule. On every
finished decode step the node's routing goes into `RoutingStats`; a plan is computed when the
statistics report a workload shift (if `detect`) or every `period_tokens` tokens of the cluster.
The published rule moves to P' only when C(P') + T_mig < C(P), with C the expected latency of a
decode step (`latency_model.expected_latency`) over the steps of one period, and T_mig the time the
new replicas take to load at the migration's share of the links into their nodes.

Pure numpy; nothing here imports nats.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from services.placement.latency_model import expected_latency
from services.placement.stats import RoutingStats
from services.placement.types import Cluster, Placement, Policy, Workload


def replicas_to_load(new: Placement, current: Placement, cluster: Cluster) -> np.ndarray:
    """[N] int: replicas each node must load to go from `current` to `new` (node level)."""
    return np.asarray((new.node_view(cluster) & ~current.node_view(cluster)).sum(axis=(1, 2)))


def migration_time(loads: np.ndarray, cluster: Cluster, expert_bytes: float, share: float) -> float:
    """Seconds until every node has loaded its replicas over its best incoming link at `share` of it."""
    N = cluster.num_nodes
    worst = 0.0
    for m in np.flatnonzero(loads > 0):
        bw = max((cluster.bandwidth_Bps[k, m] for k in range(N) if k != m), default=np.inf)
        worst = max(worst, float(loads[m]) * expert_bytes / (share * bw))
    return worst


@dataclass
class Replanner:
    """The simulator's controller: stats → policy → migration rule → (placement, loads) or None."""

    policy: Policy
    cluster: Cluster
    workload: Workload
    stats: RoutingStats
    expert_bytes: float
    migration_share: float = 0.5
    period_tokens: int = 8192            # cluster tokens between periodic replans
    detect: bool = True                  # replan on a detected shift too
    log: list[str] = field(default_factory=list)
    _since: int = 0

    def __call__(self, node: int, experts: np.ndarray, now: float, current: Placement
                 ) -> tuple[Placement, np.ndarray] | None:
        event = self.stats.add_tokens(node, experts)
        self._since += experts.shape[0]
        shifted = self.detect and event is not None
        if not shifted and self._since < self.period_tokens:
            return None
        self._since = 0
        if shifted:
            self.log.append(f"{now:.2f}s shift detected at node {node}")
        return self._plan(now, current)

    def _plan(self, now: float, current: Placement) -> tuple[Placement, np.ndarray] | None:
        f, coact = self.stats.counts(), self.stats.coactivation()
        steps = self.period_tokens / max(float(self.workload.batch.sum()), 1.0)  # decode steps per node
        per_replica = self.expert_bytes / (self.migration_share * float(np.min(
            self.cluster.bandwidth_Bps[~np.eye(self.cluster.num_nodes, dtype=bool)], initial=np.inf)))
        wl = replace(self.workload, migration_cost_s=per_replica / max(steps, 1.0))
        new = self.policy(f, self.cluster, coact=coact, current=current, workload=wl)
        loads = replicas_to_load(new, current, self.cluster)
        if loads.sum() == 0:
            return None
        t_mig = migration_time(loads, self.cluster, self.expert_bytes, self.migration_share)
        c_new = expected_latency(new, self.cluster, f, coact, self.workload) * steps
        c_cur = expected_latency(current, self.cluster, f, coact, self.workload) * steps
        accept = c_new + t_mig < c_cur
        self.log.append(f"{now:.2f}s plan: C(P')={c_new:.2f}s + T_mig={t_mig:.2f}s vs C(P)={c_cur:.2f}s, "
                        f"{int(loads.sum())} replicas: {'accepted' if accept else 'rejected'}")
        return (new, loads) if accept else None
