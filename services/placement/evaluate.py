"""Run placement policies through a scenario: solve on the profile, simulate the test trace, report.

Pure numpy; nothing here imports nats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.placement.policies import get_policy
from services.placement.replan import Replanner
from services.placement.scenarios import Scenario
from services.placement.simulator import SimResult, simulate
from services.placement.stats import RoutingStats
from services.placement.types import Placement, proxy_objective, validate


@dataclass
class PolicyRun:
    """One policy on one scenario."""

    scenario: str
    policy: str
    solve_s: float
    proxy: float                 # Σ f·remote on the profile counts the policy saw
    proxy_share: float           # the same as a share of all (token, expert) calls
    sim: SimResult
    log: tuple[str, ...] = ()

    def row(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        r = self.sim
        return {
            "scenario": self.scenario, "policy": self.policy, "solve_s": round(self.solve_s, 4),
            "proxy_objective": self.proxy, "proxy_remote_share": round(self.proxy_share, 4),
            "requests": r.requests, "tokens": r.tokens, "remote_calls": r.remote_calls,
            "remote_share": round(r.remote_share, 4), "messages": r.messages,
            "bytes_across": r.bytes_across, "mean_latency_s": round(r.mean_latency_s, 4),
            "p99_latency_s": round(r.p99_latency_s, 4), "tokens_per_s": round(r.tokens_per_s, 2),
            "mean_batch": round(r.mean_batch, 2), "migrations": r.migrations, "hops": r.hops,
            "foreign_kv_peak_bytes": [float(x) for x in r.foreign_kv_peak_bytes],
            "migrated_replicas": r.migrated_replicas,
        }


def place(scenario: Scenario, policy: str) -> tuple[Placement, float]:
    """The policy's placement for the scenario's profile statistics, and its solve time (s)."""
    f = scenario.profile.counts(scenario.cluster.num_nodes)
    coact = scenario.profile.coactivation(scenario.cluster.num_nodes)
    fn = get_policy(policy)
    t0 = time.perf_counter()
    placement = fn(f, scenario.cluster, coact=coact, workload=scenario.workload)
    solve = time.perf_counter() - t0
    validate(placement, scenario.cluster, f.shape[1], f.shape[2], scenario.workload.kv_slots_per_layer)
    return placement, solve


def run(scenario: Scenario, policy: str, *, replan: bool = False, detect: bool = True) -> PolicyRun:
    """Solve, then simulate; with `replan`, the same policy replans while serving (see replan.py)."""
    placement, solve = place(scenario, policy)
    f = scenario.profile.counts(scenario.cluster.num_nodes)
    proxy = proxy_objective(f, placement, scenario.cluster)
    controller = None
    if replan:
        shape = scenario.shape
        stats = RoutingStats(scenario.cluster.num_nodes, shape.num_layers, shape.num_experts, shape.top_k)
        controller = Replanner(get_policy(policy), scenario.cluster, scenario.workload, stats,
                               expert_bytes=shape.expert_bytes, migration_share=scenario.config.migration_share,
                               detect=detect, local_load_bytes_per_s=scenario.config.local_load_bytes_per_s)
    sim = simulate(scenario.test, scenario.cluster, placement, scenario.config, controller=controller)
    log = tuple(controller.log) + tuple(sim.events) if controller is not None else ()
    return PolicyRun(scenario=scenario.name, policy=policy, solve_s=solve, proxy=proxy,
                     proxy_share=proxy / max(float(f.sum()), 1.0), sim=sim, log=log)


def latency_by_phase(run_: PolicyRun, at_request: int) -> tuple[float, float]:
    """Mean latency (s) of requests before / from the `at_request`-th request of each node."""
    r = run_.sim
    before = r.request_index < at_request
    lat_b, lat_a = r.latencies_s[before], r.latencies_s[~before]
    return (float(lat_b.mean()) if lat_b.size else float("nan"),
            float(lat_a.mean()) if lat_a.size else float("nan"))


def table(runs: list[PolicyRun]) -> str:
    """A fixed-width table of runs (one line per run)."""
    head = (f"{'policy':10s} {'solve s':>8s} {'proxy %':>8s} {'remote %':>8s} {'messages':>9s} {'MB across':>10s} "
            f"{'hops':>7s} {'mean s':>8s} {'p99 s':>8s} {'tok/s':>8s} {'batch':>6s} {'migr':>5s}")
    lines = [head, "-" * len(head)]
    for x in runs:
        r = x.sim
        lines.append(
            f"{x.policy:10s} {x.solve_s:8.3f} {100 * x.proxy_share:8.1f} {100 * r.remote_share:8.1f} "
            f"{r.messages:9d} {r.bytes_across / 1e6:10.1f} {r.hops:7d} {r.mean_latency_s:8.3f} {r.p99_latency_s:8.3f} "
            f"{r.tokens_per_s:8.1f} {r.mean_batch:6.2f} {r.migrations:5d}"
        )
    return "\n".join(lines)


def relative(a: float, b: float) -> float:
    """(a - b) / b as a fraction; nan when b is 0."""
    return (a - b) / b if b else float(np.nan)
