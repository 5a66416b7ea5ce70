"""Replanning while serving: statistics in, a new placement out when the migration rule accepts it.

Used by the simulator as its controller. (The placement service applies the rule in the measure its
policy minimises, objectives.judge; the simulator judges every policy by expected latency, the
quantity it simulates.) On every finished decode step the node's routing goes into `RoutingStats`; a
plan is computed when the statistics report a workload shift (if `detect`) or every `period_tokens`
tokens of the cluster.
The published rule moves to P' only when C(P') + T_mig < C(P), with C the expected latency of a
decode step (`latency_model.expected_latency`) summed over a horizon, and T_mig the time the new
replicas take to load. The paper leaves the horizon open; here it is the tokens served since the last
accepted plan (at least one period): the new workload is expected to last as long as the last one did.

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


def migration_time(loads: np.ndarray, cluster: Cluster, expert_bytes: float, share: float,
                   local_load_bytes_per_s: float = 0.0) -> float:
    """Seconds until every node has loaded its replicas: from local storage at `local_load_bytes_per_s` when
    that is > 0, else over its best incoming link at `share` of it (as the simulator does)."""
    if local_load_bytes_per_s > 0:
        return float(loads.max(initial=0)) * expert_bytes / local_load_bytes_per_s
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
    local_load_bytes_per_s: float = 0.0          # as SimConfig.local_load_bytes_per_s
    log: list[str] = field(default_factory=list)
    _since: int = 0
    _since_plan: int = 0

    def __call__(self, node: int, experts: np.ndarray, now: float, current: Placement
                 ) -> tuple[Placement, np.ndarray] | None:
        event = self.stats.add_tokens(node, experts)
        self._since += experts.shape[0]
        self._since_plan += experts.shape[0]
        shifted = self.detect and event is not None
        if not shifted and self._since < self.period_tokens:
            return None
        self._since = 0
        if shifted:
            self.log.append(f"{now:.2f}s shift detected at node {node}")
        return self._plan(now, current)

    def _plan(self, now: float, current: Placement) -> tuple[Placement, np.ndarray] | None:
        f, coact = self.stats.counts(), self.stats.coactivation()
        horizon = max(self._since_plan, self.period_tokens)
        steps = horizon / max(float(self.workload.batch.sum()), 1.0)     # decode steps per node
        # one replica's load time at each node (links may differ)
        one = np.array([migration_time(load, self.cluster, self.expert_bytes, self.migration_share,
                                       self.local_load_bytes_per_s) for load in np.eye(self.cluster.num_nodes)])
        wl = replace(self.workload, migration_cost_s=one / max(steps, 1.0))
        new = self.policy(f, self.cluster, coact=coact, current=current, workload=wl)
        loads = replicas_to_load(new, current, self.cluster)
        if loads.sum() == 0:
            self.log.append(f"{now:.2f}s plan: the policy keeps the current placement")
            return None
        t_mig = migration_time(loads, self.cluster, self.expert_bytes, self.migration_share,
                               self.local_load_bytes_per_s)
        c_new = expected_latency(new, self.cluster, f, coact, self.workload) * steps
        c_cur = expected_latency(current, self.cluster, f, coact, self.workload) * steps
        accept = c_new + t_mig < c_cur
        self.log.append(f"{now:.2f}s plan: C(P')={c_new:.2f}s + T_mig={t_mig:.2f}s vs C(P)={c_cur:.2f}s, "
                        f"{int(loads.sum())} replicas: {'accepted' if accept else 'rejected'}")
        if not accept:
            return None
        self._since_plan = 0
        return new, loads
