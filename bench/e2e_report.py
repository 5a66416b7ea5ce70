"""Tables of bench/e2e.py: per policy (real and simulated), the ratios of issues 13 and 14, the routes."""

from __future__ import annotations

import argparse
import math
import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.e2e import Measured
    from bench.e2e_sim import Prediction, SimSetup

ROUTED = ("pipeline", "route")


def print_report(machine: str, args: argparse.Namespace, setup: SimSetup, measured: list[Measured],
                 predicted: list[Prediction]) -> None:
    t = setup.timing
    print(f"# Prism end-to-end — {machine}")
    print(
        "DeepSeek-V2-Lite shape at tiny widths (26 MoE layers × 64 experts, top-6, 2 shared, hidden 64); 3 nodes "
        "with 1/1/2 hosts at 30% of the experts each (embedded in the gatings); 2 ms one way, 500 Mbit/s per link "
        f"(node to node 4 ms one way through the hub); {args.prompts_per_node} prompts per node (its own domain), "
        f"{args.max_tokens} tokens each, greedy; Poisson {args.rate:g} requests/s per node (seed {args.seed})."
    )
    print(f"Simulator timing (this process, batch 1, 1 thread): dense part {1e3 * t.dense_time_s:.3f} ms per "
          f"MoE layer, {1e3 * t.expert_time_s:.3f} ms per expert call; {setup.trace.num_tokens} decode steps.\n")
    print(batch1_table(measured, predicted))
    print()
    print(poisson_table(measured, predicted))
    print()
    print(ratio_table(measured, predicted))
    print()
    for m in measured:
        print(f"{m.policy} (epoch {m.plan['epoch']}): {routes_line(m.plan)}")
        for error in m.errors:
            print(f"  error {error}")


def batch1_table(measured: list[Measured], predicted: list[Prediction]) -> str:
    lines = ["| policy | ms/token | sim ms/token | real / sim | kB across per decode step | sim kB per step |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, p in zip(measured, predicted, strict=True):
        lines.append(f"| {m.policy} | {m.ms_per_token_b1:.1f} | {p.ms_per_token_b1:.1f} | "
                     f"{m.ms_per_token_b1 / p.ms_per_token_b1:.2f} | {m.bytes_per_token_b1 / 1e3:.1f} | "
                     f"{p.bytes_per_token_b1 / 1e3:.1f} |")
    return "\n".join(lines)


def poisson_table(measured: list[Measured], predicted: list[Prediction]) -> str:
    lines = ["| policy | mean ms | p99 ms | mean without prefill ms | sim mean ms | real / sim | sim p99 ms "
             "| kB across per token | sim kB per token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, p in zip(measured, predicted, strict=True):
        mean, no_prefill = _mean(m.poisson_ms), _mean(m.poisson_no_prefill_ms)
        lines.append(f"| {m.policy} | {mean:.0f} | {_p99(m.poisson_ms):.0f} | {no_prefill:.0f} | "
                     f"{p.poisson_mean_ms:.0f} | {no_prefill / p.poisson_mean_ms:.2f} | {p.poisson_p99_ms:.0f} | "
                     f"{m.bytes_per_token_poisson / 1e3:.1f} | {p.bytes_per_token_poisson / 1e3:.1f} |")
    return "\n".join(lines)


def ratio_table(measured: list[Measured], predicted: list[Prediction]) -> str:
    """The goals' ratios, real and simulated, each from its own run's numbers."""
    real = {m.policy: m for m in measured}
    sim = {m.policy: p for m, p in zip(measured, predicted, strict=True)}
    lines = ["| ratio | metric | real | simulated | goal |", "|---|---|---:|---:|---|"]
    home = [p for p in real if p not in ROUTED]
    if "route" in real and home:
        best_real = min(home, key=lambda p: real[p].ms_per_token_b1)
        best_sim = min(home, key=lambda p: sim[p].ms_per_token_b1)
        lines.append(f"| route / best stay-home (real {best_real}, sim {best_sim}) | ms/token, batch 1 | "
                     f"{real['route'].ms_per_token_b1 / real[best_real].ms_per_token_b1:.2f} | "
                     f"{sim['route'].ms_per_token_b1 / sim[best_sim].ms_per_token_b1:.2f} | ≤ 0.35 |")
    if "route" in real and "pipeline" in real:
        lines.append(f"| route / pipeline | ms/token, batch 1 | "
                     f"{real['route'].ms_per_token_b1 / real['pipeline'].ms_per_token_b1:.2f} | "
                     f"{sim['route'].ms_per_token_b1 / sim['pipeline'].ms_per_token_b1:.2f} | ≤ 1.0 |")
    if "latency" in real and "eplb" in real:
        for what, r, s in (("ms/token, batch 1", real["latency"].ms_per_token_b1 / real["eplb"].ms_per_token_b1,
                            sim["latency"].ms_per_token_b1 / sim["eplb"].ms_per_token_b1),
                           ("mean latency, Poisson", _mean(real["latency"].poisson_ms) / _mean(real["eplb"].poisson_ms),
                            sim["latency"].poisson_mean_ms / sim["eplb"].poisson_mean_ms)):
            lines.append(f"| latency / eplb | {what} | {r:.2f} | {s:.2f} | ≤ 0.85 (Poisson mean) |")
    for policy, m in real.items():
        lines.append(f"| {policy}: real / simulated | ms/token, batch 1 | "
                     f"{m.ms_per_token_b1 / sim[policy].ms_per_token_b1:.2f} | | 0.8–1.2 (14), 0.85–1.15 (13) |")
    return "\n".join(lines)


def routes_line(plan: dict[str, object]) -> str:
    """Each home's route as runs of layers per executing node, or `stay-home`."""
    routes = plan.get("routes")
    if not isinstance(routes, dict) or not routes:
        return "stay-home"
    parts = []
    for home, names in routes.items():
        runs: list[str] = []
        start = 0
        for i in range(1, len(names) + 1):
            if i == len(names) or names[i] != names[start]:
                runs.append(f"{names[start]}[{start}-{i - 1}]")
                start = i
        parts.append(f"{home}: {' '.join(runs)}")
    return "; ".join(parts)


def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else math.nan


def _p99(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
