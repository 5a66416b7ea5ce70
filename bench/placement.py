"""Placement benchmark: policies × scenarios × regimes on the simulator, solve times at scale, and the
published comparison (prism against eplb on the published testbed).

    .venv/bin/python bench/placement.py [--requests 60] [--seed 0] [--quick] [--json FILE]

Per cell (scenario × regime) and policy: proxy objective Σ f·remote on the statistics the policy saw,
its gap to `optimal`, simulated mean / p99 request latency, MB across nodes, hops, solve time. A `*`
marks the best mean latency of the cell; `latency` is checked against the best other stay-home policy,
`route` against min(`pipeline`, best stay-home policy).
Machine, shapes, batch and request sizes are printed with the tables. Synthetic routing is calibrated
to FACTS.md (tests/placement/test_synthetic.py); timing constants in services/placement/scenarios.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.placement import evaluate  # noqa: E402
from services.placement import scenarios as sc  # noqa: E402
from services.placement.policies import POLICIES, get_policy  # noqa: E402
from services.placement.synthetic import PRESETS, Traffic, generate  # noqa: E402
from services.placement.types import Cluster, Workload  # noqa: E402

POLICY_ORDER = ("uniform", "redundance", "eplb", "prism", "optimal", "latency", "pipeline", "route")
STAY_HOME = POLICY_ORDER[:6]
PUBLISHED = {"deepseek-v2-lite": "−30.6%", "mixtral-8x7b": "−2–3%"}


def cell(model: str, regime: str, requests: int, seed: int) -> tuple[Any, list[evaluate.PolicyRun]]:
    scenario = sc.published_testbed(model, regime, requests_per_node=requests, seed=seed)
    return scenario, [evaluate.run(scenario, p) for p in POLICY_ORDER]


def print_cell(scenario: Any, runs: list[evaluate.PolicyRun]) -> dict[str, Any]:
    opt = next(r for r in runs if r.policy == "optimal").proxy
    best = min(r.sim.mean_latency_s for r in runs)
    print(f"\n== {scenario.name}: {scenario.note}")
    print(f"   test load: {scenario.test.num_tokens} tokens in {len(set(scenario.test.request.tolist()))} requests, "
          f"Poisson {scenario.config.arrival_rate:.3f} req/s per node")
    print(f"{'policy':10s} {'proxy':>10s} {'gap opt':>8s} {'remote %':>8s} {'mean s':>8s} {'p99 s':>8s} "
          f"{'MB across':>10s} {'hops':>7s} {'solve s':>8s}")
    for r in runs:
        gap = (r.proxy - opt) / opt if opt else 0.0
        mark = "*" if r.sim.mean_latency_s == best else " "
        print(f"{r.policy:10s} {r.proxy:10.0f} {100 * gap:7.1f}% {100 * r.sim.remote_share:8.1f} "
              f"{r.sim.mean_latency_s:7.3f}{mark} {r.sim.p99_latency_s:8.3f} {r.sim.bytes_across / 1e6:10.1f} "
              f"{r.sim.hops:7d} {r.solve_s:8.3f}")
    by = {r.policy: r.sim.mean_latency_s for r in runs}
    others = min(by[p] for p in STAY_HOME if p != "latency")
    home = min(by[p] for p in STAY_HOME)
    goal = min(by["pipeline"], home)
    print(f"latency vs best other stay-home policy: {100 * (by['latency'] / others - 1):+.2f}% "
          f"({'ok' if by['latency'] <= others else 'worse'})")
    print(f"route vs min(pipeline, best stay-home): {100 * (by['route'] / goal - 1):+.2f}% "
          f"({'ok' if by['route'] <= goal else 'worse'}); "
          f"vs pipeline {100 * (by['route'] / by['pipeline'] - 1):+.2f}%, "
          f"vs best stay-home {100 * (by['route'] / home - 1):+.2f}%")
    return {"scenario": scenario.name, "runs": [r.row() for r in runs],
            "latency_vs_best_other": by["latency"] / others - 1, "route_vs_goal": by["route"] / goal - 1}


def published_comparison(cells: dict[tuple[str, str], list[evaluate.PolicyRun]]) -> None:
    print("\n== Published comparison: prism vs eplb, mean request latency (lower is better)")
    print(f"{'model':18s} {'regime':8s} {'eplb s':>8s} {'prism s':>8s} {'prism vs eplb':>14s} {'published':>10s} "
          f"{'latency vs eplb':>16s}")
    for (model, regime), runs in cells.items():
        by = {r.policy: r.sim.mean_latency_s for r in runs}
        print(f"{model:18s} {regime:8s} {by['eplb']:8.3f} {by['prism']:8.3f} "
              f"{100 * evaluate.relative(by['prism'], by['eplb']):+13.1f}% {PUBLISHED[model]:>10s} "
              f"{100 * evaluate.relative(by['latency'], by['eplb']):+15.1f}%")


def solve_times(quick: bool) -> list[dict[str, Any]]:
    """Every policy on the DeepSeek-V3 shape (64 nodes × 58 × 256); optimal also at the published scale."""
    shape = PRESETS["deepseek-v3"]
    nodes = 16 if quick else 64
    trace = generate(shape, Traffic.dedicated(nodes, 8, 2, tokens_per_request=(4, 8)), seed=0)
    f = trace.counts(nodes)
    slots = int(0.3 * shape.num_layers * shape.num_experts)
    cluster = Cluster.from_slots([slots] * nodes, rtt_s=0.004, bandwidth_Bps=500e6 / 8)
    coact = trace.coactivation(nodes, samples_per_node=16)
    wl = Workload.uniform(nodes, batch=8, bytes_per_token=shape.bytes_per_token, top_k=shape.top_k)
    print(f"\n== Solve time, DeepSeek-V3 shape: {nodes} nodes × {shape.num_layers} layers × {shape.num_experts} "
          f"experts, {slots} slots per node")
    out = []
    for name in POLICY_ORDER:
        t0 = time.perf_counter()
        get_policy(name)(f, cluster, coact=coact, workload=wl)
        dt = time.perf_counter() - t0
        goal = 10.0 if name == "optimal" else 1.0
        print(f"{name:10s} {dt:8.3f} s  (goal <= {goal:g} s{'' if name != 'optimal' else ' at the published scale'})")
        out.append({"policy": name, "nodes": nodes, "solve_s": dt})
    small = sc.published_testbed("deepseek-v2-lite", "rtt-b8", requests_per_node=20)
    _, dt = evaluate.place(small, "optimal")
    print(f"optimal at the published scale (3 nodes, 4 GPUs × 26 × 64): {dt:.3f} s (goal <= 10 s)")
    out.append({"policy": "optimal", "nodes": 3, "solve_s": dt})
    return out


def sweep(quick: bool, seed: int) -> list[dict[str, Any]]:
    gpus = (4, 16) if quick else (4, 16, 64, 256)
    print("\n== Scaling sweep (DeepSeek-V2-Lite, 30% per GPU, nodes of 1/1/2 GPUs, 0.5–15 ms apart, batch <= 8)")
    sweep_policies = ("eplb", "prism", "optimal", "latency", "pipeline", "route")
    print(f"{'gpus':>5s} {'Mbit/s':>7s} " + " ".join(f"{p:>10s}" for p in sweep_policies) + "   (mean latency s)")
    out = []
    for g in gpus:
        for mbit in (100.0, 1000.0):
            s = sc.sweep(g, mbit, seed)
            runs = {p: evaluate.run(s, p) for p in sweep_policies}
            print(f"{g:5d} {mbit:7.0f} " + " ".join(f"{r.sim.mean_latency_s:10.3f}" for r in runs.values()))
            out.append({"gpus": g, "mbit": mbit, "runs": [r.row() for r in runs.values()]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=60, help="requests per node at batch 8 (a third at batch 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="fewer regimes and a smaller sweep")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, numpy {np.__version__}; policies: {', '.join(POLICIES)}")
    regimes = ("rtt-b8", "bw-b8") if args.quick else tuple(sc.REGIMES)
    cells: dict[tuple[str, str], list[evaluate.PolicyRun]] = {}
    results: dict[str, Any] = {"cells": []}
    for model in ("deepseek-v2-lite", "mixtral-8x7b"):
        for regime in regimes:
            scenario, runs = cell(model, regime, args.requests, args.seed)
            cells[(model, regime)] = runs
            results["cells"].append(print_cell(scenario, runs))
    published_comparison(cells)
    results["solve"] = solve_times(args.quick)
    results["sweep"] = sweep(args.quick, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
