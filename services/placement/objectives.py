"""What each policy minimises, so that the migration rule judges a proposal by the policy's own measure.

The published rule (README, Placement): move to P' only when C(P') + T_mig < C(P). One measure for
every policy would overrule the policy: `eplb` spreads load and pays remote calls for it, so under
the remote-call proxy none of its re-plans would ever pass, and `prism` would never pass a pure load
measure. Here C is the cost the policy itself minimises, over the statistics window, and T_mig is
charged in the same unit:

- `prism`, `optimal`, `redundance`: remote (token, expert) calls (the proxy; `redundance` lowers it
  with copies of the hottest experts); T_mig = replicas added × `migration_cost_calls`.
- `eplb`: calls served by the busiest host of each layer, summed over layers (a layer waits for its
  slowest host; an expert's calls split evenly over its replicas, over host speed); T_mig as above.
- `latency`: expected MoE time of a decode step (latency_model), T_mig = the replicas each node adds ×
  its `migration_cost_s` (the workload's), and P' must be better by the workload's `min_gain` (a share of C(P)):
  the model's estimate is sampled, so without it a steady workload moves experts on noise. (The
  policy applies the same test to its own candidates.)
- `route`: expected latency along each placement's routes on the two views the policy chooses by
  (`route_model.replaces`: the row view rules out a layout clearly slower row by row, within its
  margin the load view decides: a rehearsal of the homes' measured traffic in the simulator, or
  without step rates each home's step alone with the dense part); T_mig and `min_gain` as for
  `latency`.
- `uniform`, `pipeline`: ignore statistics; C is how many replicas a placement is away from the proposal and
  T_mig is 0, so its own layout is taken whenever it differs (the same hosts give the same layout,
  so it cannot thrash).

The rule keeps a policy from moving experts on noise. A plan in place that another policy made (or
the launcher's initial one) is not judged: the operator chose the new policy, so its first plan is
taken as it is.

Pure numpy; nothing here imports nats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from services.placement.route_model import RouteModel, replaces
from services.placement.types import Cluster, CoActivation, Placement, PolicyName, Workload, proxy_objective


@dataclass(frozen=True)
class Verdict:
    """The migration rule's answer: accept when after < before."""

    accept: bool
    before: float  # C(P)
    after: float  # C(P') + T_mig
    unit: str


def busiest_host_calls(freq: np.ndarray, placement: Placement, cluster: Cluster) -> float:
    """Σ over layers of the largest per-host load: (token, expert) calls of all nodes, an expert's
    calls split evenly over its replicas, each host's load over its speed."""
    calls = np.asarray(freq, dtype=np.float64).sum(axis=0)  # [L, E]
    hosts = placement.hosts  # [H, L, E]
    per_replica = calls / np.maximum(hosts.sum(axis=0), 1)
    load = (hosts * per_replica).sum(axis=2) / cluster.host_speed[:, None]  # [H, L]
    return float(load.max(axis=0).sum())


Measure = Literal["remote calls", "busiest host calls", "latency", "load", "layout"]

MEASURES: dict[PolicyName, Measure] = {
    "prism": "remote calls",
    "optimal": "remote calls",
    "redundance": "remote calls",
    "eplb": "busiest host calls",
    "latency": "latency",
    "route": "load",
    "uniform": "layout",
    "pipeline": "layout",
}
if set(MEASURES) != set(get_args(PolicyName)):  # a new policy must say what it minimises
    raise ImportError(f"no measure for {sorted(set(get_args(PolicyName)) - set(MEASURES))}")


def judge(
    policy: PolicyName,
    freq: np.ndarray,
    current: Placement,
    proposed: Placement,
    cluster: Cluster,
    *,
    coact: CoActivation | None,
    workload: Workload,
    migration_cost_calls: float,
) -> Verdict:
    """Whether moving from `current` to `proposed` pays, in the measure `policy` minimises."""
    measure = MEASURES[policy]
    if measure == "layout":
        # replicas that differ, plus one when only the routes do
        away = float(np.sum(current.hosts ^ proposed.hosts)) or float(not current.equals(proposed))
        return Verdict(away > 0, away, 0.0, "replicas")
    added_on = np.sum(proposed.hosts & ~current.hosts, axis=(1, 2))  # [H] replicas each host loads
    added = int(added_on.sum())
    if measure in ("latency", "load"):  # seconds per decode step; loading is spread over the window's steps
        model = RouteModel(cluster, freq, coact, workload)  # its set-up is the costly part: once
        migration = float(workload.node_migration_cost_s[cluster.host_node] @ added_on)
        if measure == "load":  # the row view may rule either out, as in the policy's own choice
            old, new = model.view_costs(current), model.view_costs(proposed).plus(migration)
            unit = "s/token" if model.rehearsal is not None else "s/step"  # a rehearsal: a request's per token
            return Verdict(replaces(new, old, workload.min_gain), old.load, new.load, unit)
        before, after = model.cost(current), model.cost(proposed) + migration
        return Verdict(after < before * (1.0 - workload.min_gain), before, after, "s/step")
    cost = proxy_objective if measure == "remote calls" else busiest_host_calls
    before = cost(freq, current, cluster)
    after = cost(freq, proposed, cluster) + added * migration_cost_calls
    return Verdict(after < before, before, after, "calls")
