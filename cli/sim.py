"""`prism sim`: simulate placement policies on a scenario (trace-driven, event-driven).

    prism sim --scenario NAME [--trace FILE.npz] [--policies a,b,...] [--seed S] [--json]
              [--regime rtt-b1|rtt-b8|bw-b1|bw-b8] [--requests N] [--gpus 4,16] [--mbit 100,1000]

Scenarios (model shapes, timing and traffic in `services/placement/scenarios.py`):
  testbed-deepseek  the published testbed: 3 nodes with 1, 1 and 2 GPUs, 500 Mbit/s, DeepSeek-V2-Lite
                    shape with memory for 30% of the routed experts per GPU
  testbed-mixtral   the same with the Mixtral-8x7B shape and 70% per GPU
  shift             testbed-deepseek where every node switches domain after 200 requests (--requests);
                    each policy replans while serving (statistics with shift detection + migration rule)
  sweep             scaling sweep: 4 to 256 GPUs (--gpus) × 100 to 1000 Mbit/s (--mbit)
`--trace` replaces the synthetic routing of a testbed scenario with a recorded one (at most 3 nodes;
alternate requests of each node are the statistics the policy sees and the simulated load).

Prints one table per scenario: policy, solve time, proxy remote share (on the statistics), simulated
remote share, messages and MB across nodes (expert calls and route hops), hops of hidden states
between executing nodes, mean / p99 request latency, tokens/s, mean batch, migrations. `pipeline` and
`route` run each layer on the node their routes name (see services/placement/simulator.py).
`--json` prints {"scenarios": [{"name", "note", "runs": [...]}]} instead.
Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_BAD_INPUT = 2
SCENARIOS = ("testbed-deepseek", "testbed-mixtral", "shift", "sweep")
ALL_POLICIES = "uniform,redundance,eplb,prism,optimal,latency,pipeline,route"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("sim", help="simulate placement policies on a scenario")
    p.add_argument("--scenario", required=True, help=", ".join(SCENARIOS))
    p.add_argument("--trace", help="recorded routing trace (.npz) instead of synthetic routing (testbed-*)")
    p.add_argument("--policies", default=ALL_POLICIES, help=f"comma separated (default {ALL_POLICIES})")
    p.add_argument("--seed", type=int, default=0, help="seed of traffic, routing and arrivals")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--regime", default="rtt-b8", help="testbed links/batch: rtt-b1, rtt-b8, bw-b1, bw-b8")
    p.add_argument("--requests", type=int,
                   help="requests per node (testbed 60; shift: before the switch, 200; sweep: 240 in all)")
    p.add_argument("--gpus", default="4,16,64,256", help="sweep: GPU counts")
    p.add_argument("--mbit", default="100,1000", help="sweep: link rates in Mbit/s")
    p.set_defaults(func=handler)


def _fail(message: str) -> int:
    print(f"prism sim: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _ints(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"{what} must be comma separated numbers, got {text!r}") from exc
    if not values or min(values) <= 0:
        raise ValueError(f"{what} must be positive numbers, got {text!r}")
    return values


def _scenarios(args: argparse.Namespace) -> list[Any]:
    from services.placement import scenarios as sc
    from services.placement.traces import RoutingTrace

    name, seed = args.scenario, args.seed
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; accepted: {', '.join(SCENARIOS)}")
    if args.trace and not name.startswith("testbed-"):
        raise ValueError("--trace works with the testbed-deepseek and testbed-mixtral scenarios")
    if args.requests is not None and args.requests < 2:
        raise ValueError(f"--requests must be >= 2, got {args.requests}")
    if name.startswith("testbed-"):
        model = "deepseek-v2-lite" if name == "testbed-deepseek" else "mixtral-8x7b"
        if args.trace:
            share = 0.3 if model == "deepseek-v2-lite" else 0.7
            return [sc.trace_testbed(RoutingTrace.load(args.trace), args.regime, share, seed)]
        return [sc.published_testbed(model, args.regime, requests_per_node=args.requests or 60, seed=seed)]
    if name == "shift":
        return [sc.shift(args.requests or 200, seed)]
    gpus, mbits = _ints(args.gpus, "--gpus"), _ints(args.mbit, "--mbit")
    return [sc.sweep(int(g), m, seed, args.requests) for g in gpus for m in mbits]


def handler(args: argparse.Namespace) -> int:
    from services.placement import evaluate
    from services.placement.errors import PlacementError
    from services.placement.policies import get_policy

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    try:
        for p in policies:
            get_policy(p)
        scenarios = _scenarios(args)
    except (PlacementError, ValueError) as exc:
        return _fail(str(exc))
    out: list[dict[str, Any]] = []
    for s in scenarios:
        replan = s.name == "shift"
        runs = [evaluate.run(s, p, replan=replan) for p in policies]
        entry: dict[str, Any] = {"name": s.name, "note": s.note, "runs": [r.row() for r in runs]}
        if replan:
            at = args.requests or 200
            for r, row in zip(runs, entry["runs"], strict=True):
                before, after = evaluate.latency_by_phase(r, at)
                row.update(mean_latency_before_shift_s=round(before, 4), mean_latency_after_shift_s=round(after, 4),
                           log=list(r.log))
        out.append(entry)
        if not args.json:
            _print(s, runs, replan, args.requests or 200)
    if args.json:
        print(json.dumps({"scenarios": out}, indent=1))
    return 0


def _print(scenario: Any, runs: list[Any], replan: bool, at: int) -> None:
    from services.placement import evaluate

    print(f"\n== {scenario.name}: {scenario.note}")
    print(f"   {scenario.test.num_tokens} tokens, {len(set(scenario.test.request.tolist()))} requests, "
          f"arrivals {scenario.config.arrival_rate:.3f}/s per node")
    print(evaluate.table(runs))
    if replan:
        for r in runs:
            before, after = evaluate.latency_by_phase(r, at)
            print(f"{r.policy:10s} mean latency before the switch {before:.3f} s, after {after:.3f} s")
            for line in r.log:
                print(f"    {line}")
