"""What measuring the traffic buys: each policy planned with the workload a running cluster measures,
against the blind one the placement service used before it measured (batch 1 at every node, no step
rates, no dense time, the default 40 µs per expert invocation), both simulated on the same test trace.

"Measured" is the simulator's pilot workload (services/placement/scenarios.py `pilot_workload`): the
batch per node from a simulated run of the profile, each home's decode steps per second, the dense part
of a layer and one expert invocation at the simulator's timing: what `services/placement/load.py`
measures from the gatings' reports and the hosts' heartbeats. The cells: the published testbed (3 nodes
with 1/1/2 GPUs, 500 Mbit/s; DeepSeek-V2-Lite at 30% of the experts per GPU, Mixtral-8x7B at 70%) in
every regime, for each arrival seed.

    .venv/bin/python bench/calibration.py [--seeds 0,1,2] [--policies latency,route]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.placement import evaluate, scenarios
from services.placement.simulator import simulate
from services.placement.types import Workload

MODELS = ("deepseek-v2-lite", "mixtral-8x7b")


def blind(workload: Workload) -> Workload:
    """What the placement service told the policies before it measured anything."""
    return Workload.uniform(len(workload.batch), bytes_per_token=workload.bytes_per_token, top_k=workload.top_k)


def mean_latency(scenario: scenarios.Scenario, policy: str, workload: Workload) -> float:
    placement, _ = evaluate.place(replace(scenario, workload=workload), policy)
    return simulate(scenario.test, scenario.cluster, placement, scenario.config).mean_latency_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="arrival and trace seeds, comma-separated")
    parser.add_argument("--policies", default="latency,route")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    policies = args.policies.split(",")
    print(f"# blind vs measured workload — {platform.machine()}, {os.cpu_count()} cores; seeds {seeds}")
    print("mean request latency (s) simulated, mean over seeds; blind / measured > 1: measuring pays\n")
    print("| model | regime | " + " | ".join(f"{p} blind | {p} measured | ratio" for p in policies) + " |")
    print("|---|---|" + "---:|---:|---:|" * len(policies))
    ratios: dict[str, list[float]] = {p: [] for p in policies}
    for model in MODELS:
        for regime in scenarios.REGIMES:
            cells = [scenarios.published_testbed(model, regime, seed=s) for s in seeds]
            row = []
            for policy in policies:
                b = statistics.mean(mean_latency(sc, policy, blind(sc.workload)) for sc in cells)
                m = statistics.mean(mean_latency(sc, policy, sc.workload) for sc in cells)
                ratios[policy].append(b / m)
                row.append(f"{b:.3f} | {m:.3f} | {b / m:.2f}×")
            print(f"| {model} | {regime} | " + " | ".join(row) + " |", flush=True)
    for policy, r in ratios.items():
        print(f"\n{policy}: blind / measured median {statistics.median(r):.2f}×, min {min(r):.2f}×, max {max(r):.2f}×")


if __name__ == "__main__":
    main()
