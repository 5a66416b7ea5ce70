"""What planning on each link's real rate is worth, in the simulator.

A topology file that leaves rates out, or states them wrong, has the placement service plan every link at
`BANDWIDTH_MBIT` (500). Here each node's link to the hub gets its own rate (drawn from 20, 50, 200 and
1000 Mbit/s; between two nodes the slower link's), and each policy solves twice: on the true rates and
on 500 Mbit/s everywhere. Both plans are simulated on the true rates; the table prints mean request
latency and true / declared (< 1: planning on the measured rates pays).

Scenario: `scenarios.sweep`'s (DeepSeek-V2-Lite, nodes of 1, 1 and 2 GPUs at 30% of the experts each,
on a plane 0.5-14.6 ms apart, decode batch 8, 90% of a node's requests its own domain).

    .venv/bin/python bench/link_rates.py [--gpus 4,8] [--seeds 0,1,2] [--policies latency,route]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.placement import scenarios as sc  # noqa: E402
from services.placement.policies import get_policy  # noqa: E402
from services.placement.simulator import simulate  # noqa: E402
from services.placement.synthetic import PRESETS, Traffic  # noqa: E402
from services.placement.types import Cluster  # noqa: E402

RATES_MBIT = (20.0, 50.0, 200.0, 1000.0)
DECLARED_MBIT = 500.0


def with_rates(cluster: Cluster, mbit: np.ndarray) -> Cluster:
    """`cluster` whose node i reaches the hub at mbit[i]: between two nodes the slower link's rate."""
    pair = np.minimum(mbit[:, None], mbit[None, :]) * 1e6 / 8
    np.fill_diagonal(pair, np.inf)
    return replace(cluster, bandwidth_Bps=pair)


def scenario(gpus: int, seed: int) -> tuple[sc.Scenario, Cluster, np.ndarray]:
    """(the scenario on the true rates, the same cluster at DECLARED_MBIT everywhere, the true rates)."""
    shape = PRESETS["deepseek-v2-lite"]
    cluster = sc.sweep_cluster(shape, gpus, DECLARED_MBIT * 1e6 / 8, seed)
    n = cluster.num_nodes
    mbit = np.random.default_rng(1000 + seed).choice(RATES_MBIT, size=n)
    traffic = Traffic.dedicated(n, min(n, 8), max(2, 240 // n), purity=0.9, tokens_per_request=(16, 48))
    true = sc.build(f"rates-{gpus}gpu-s{seed}", shape, with_rates(cluster, mbit), traffic, max_batch=8, seed=seed)
    return true, with_rates(cluster, np.full(n, DECLARED_MBIT)), mbit


def solve_and_simulate(s: sc.Scenario, planned_on: Cluster, policy: str) -> float:
    """Mean request latency (s) on the scenario's true cluster of the plan made on `planned_on`."""
    f = s.profile.counts(s.cluster.num_nodes)
    coact = s.profile.coactivation(s.cluster.num_nodes)
    placement = get_policy(policy)(f, planned_on, coact=coact, workload=s.workload)
    return simulate(s.test, s.cluster, placement, s.config).mean_latency_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="4,8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--policies", default="latency,route")
    args = p.parse_args()
    policies = args.policies.split(",")
    print("| GPUs (nodes) | seed | node rates, Mbit/s | "
          + " | ".join(f"`{x}` true | declared | true / declared" for x in policies) + " |")
    print("|---|---:|---|" + "---:|---:|---:|" * len(policies))
    started = time.perf_counter()
    for gpus in map(int, args.gpus.split(",")):
        for seed in map(int, args.seeds.split(",")):
            s, declared, mbit = scenario(gpus, seed)
            cells = []
            for policy in policies:
                true_s, declared_s = solve_and_simulate(s, s.cluster, policy), solve_and_simulate(s, declared, policy)
                cells.append(f"{true_s:.3f} | {declared_s:.3f} | **{true_s / declared_s:.3f}**")
            rates = ", ".join(f"{x:g}" for x in mbit)
            print(f"| {gpus} ({s.cluster.num_nodes}) | {seed} | {rates} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s; mean request latency in s, simulated on the true rates")


if __name__ == "__main__":
    main()
