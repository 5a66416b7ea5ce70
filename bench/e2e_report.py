"""Tables of bench/e2e.py: per policy (real and simulated), the ratios of issues 13 and 14, the routes."""

from __future__ import annotations

import argparse
import math
import os
import statistics
from dataclasses import replace
from typing import TYPE_CHECKING

from bench.e2e_sim import message_time_s
from cli.status import describe_link

if TYPE_CHECKING:
    from bench.e2e import Measured
    from bench.e2e_sim import Prediction, SimSetup

ROUTED = ("pipeline", "route")


def print_report(machine: str, args: argparse.Namespace, setup: SimSetup, measured: list[Measured],
                 predicted: list[Prediction], *, calibrated: list[Prediction], message_cpu_s: float) -> None:
    """`predicted`: the simulator with the links as configured; `calibrated`: the same plus each
    stack's measured software time per message (`message_time_s` of its probe)."""
    t = setup.timing
    print(f"# Prism end-to-end — {machine}")
    print(
        "DeepSeek-V2-Lite shape at tiny widths (26 MoE layers × 64 experts, top-6, 2 shared, hidden 64); 3 nodes "
        "with 1/1/2 hosts at 30% of the experts each (embedded in the gatings); "
        f"{'/'.join(f'{d:g}' for d in args.delays_ms)} ms one way to the hub, 500 Mbit/s per link "
        f"(node to node: the two delays one way); {args.prompts_per_node} prompts per node (its own domain), "
        f"{args.max_tokens} tokens each, greedy; Poisson {args.rate:g} requests/s per node (seed {args.seed})."
    )
    layers, k = len(setup.moe_layers), setup.trace.meta.top_k
    per_layer = t.dense_time_s + t.dense_time_per_token_s + k * (t.expert_time_s + t.expert_time_per_token_s)
    print(f"Simulator timing (the model in this process, 1 torch thread, decode batches 1/4/8 and a prompt, "
          f"least squares; × the gating's engine at batch 1): per MoE layer {1e3 * t.dense_time_s:.3f} ms + "
          f"{1e3 * t.dense_time_per_token_s:.4f} ms per token, per expert call {1e3 * t.expert_time_s:.4f} ms + "
          f"{1e3 * t.expert_time_per_token_s:.4f} ms per row; {1e3 * per_layer * layers:.1f} ms per batch-1 decode "
          f"step with every expert local; a route segment's fixed work {1e3 * t.segment_time_s:.3f} ms; "
          f"{setup.trace.num_tokens} decode steps traced.")
    booked = replace(t, message_cpu_s=message_cpu_s)  # as the "+ msg" simulations ran
    times = ", ".join(f"{m.policy} {1e3 * message_time_s(m.probe_extra_s, booked):.2f} "
                      f"({1e3 * message_time_s(m.loaded_extra_s, booked):.2f} under load)" for m in measured)
    shares = ", ".join(f"{m.policy} {m.compute_share:.2f}" for m in measured)
    print("Software time of a message one way, measured on each stack (\"+ msg\" columns: a 2-expert call to a "
          "host of another node, beyond the configured round trip and the simulator's compute of the 2 experts, "
          "halved; probed after the rounds for batch 1 and during the Poisson round for it; and every host's "
          f"compute on one of this machine's {os.cpu_count()} cores, which the stacks' nodes share, a node's hosts "
          f"one at a time on its gating's thread), ms: {times}. Under Poisson the hosts compute at the share of "
          f"the cores the other processes (brokers, link emulators, this client) left the gatings: {shares}. A "
          f"message's CPU at each end ({1e3 * message_cpu_s:.3f} ms: the gatings' CPU in the stay-home Poisson "
          "rounds beyond the compute the simulator books, per end of a round trip) is booked on the hosts and "
          "left out of the message time.\n")
    print(batch1_table(measured, predicted, calibrated))
    routed = [m for m in measured if m.policy in ROUTED]
    if routed:
        waits = ", ".join(f"{m.policy} {m.hop_ms_per_step_b1:.1f} (segments running {m.segment_ms_per_step_b1:.1f})"
                          for m in routed)
        print(f"\nOf a routed step at batch 1, the home's wait for other nodes' layers (`hop_wait_s` per step) and, "
              f"of that, the other gatings' time running its segments (`segment_s`), ms: {waits}.")
    print()
    print(poisson_table(measured, predicted, calibrated))
    print()
    print(ratio_table(measured, predicted))
    print()
    for m in measured:
        print(f"{m.policy} (epoch {m.plan['epoch']}): {routes_line(m.plan)}")
        if m.links:  # the placement service's (measured where they moved); the simulator ran on the configured
            print("  the plan's links (KV `links`): " + ", ".join(map(describe_link, m.links)))
        for error in m.errors:
            print(f"  error {error}")


def batch1_table(measured: list[Measured], predicted: list[Prediction], calibrated: list[Prediction]) -> str:
    lines = ["| policy | ms/token | sim ms/token | real / sim | sim + msg | real / (sim + msg) "
             "| kB across per decode step | sim kB per step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, p, c in zip(measured, predicted, calibrated, strict=True):
        real = m.ms_per_token_b1
        lines.append(f"| {m.policy} | {real:.1f} | {p.ms_per_token_b1:.1f} | {real / p.ms_per_token_b1:.2f} | "
                     f"{c.ms_per_token_b1:.1f} | {real / c.ms_per_token_b1:.2f} | {m.bytes_per_token_b1 / 1e3:.1f} | "
                     f"{p.bytes_per_token_b1 / 1e3:.1f} |")
    return "\n".join(lines)


def poisson_table(measured: list[Measured], predicted: list[Prediction], calibrated: list[Prediction]) -> str:
    lines = ["| policy | mean ms | p99 ms | mean without prefill ms | sim mean ms | real / sim | sim + msg "
             "| real / (sim + msg) | sim p99 ms | kB across per token | sim kB per token |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, p, c in zip(measured, predicted, calibrated, strict=True):
        mean, no_prefill = _mean(m.poisson_ms), _mean(m.poisson_no_prefill_ms)
        # whole requests on both sides: the simulation runs each request's prompt as its first step
        lines.append(f"| {m.policy} | {mean:.0f} | {_p99(m.poisson_ms):.0f} | {no_prefill:.0f} | "
                     f"{p.poisson_mean_ms:.0f} | {mean / p.poisson_mean_ms:.2f} | {c.poisson_mean_ms:.0f} | "
                     f"{mean / c.poisson_mean_ms:.2f} | {p.poisson_p99_ms:.0f} | "
                     f"{m.bytes_per_token_poisson / 1e3:.1f} | {p.bytes_per_token_poisson / 1e3:.1f} |")
    return "\n".join(lines)


def ratio_table(measured: list[Measured], predicted: list[Prediction]) -> str:
    """The goals' ratios at batch 1 and under Poisson arrivals, real and simulated, each side from its
    own numbers of this run (the best stay-home policy is picked on each side by ms/token)."""
    real = {m.policy: m for m in measured}
    sim = {m.policy: p for m, p in zip(measured, predicted, strict=True)}
    home = [p for p in real if p not in ROUTED]
    pairs = []
    if "route" in real and home:
        best_real = min(home, key=lambda p: real[p].ms_per_token_b1)
        best_sim = min(home, key=lambda p: sim[p].ms_per_token_b1)
        pairs.append((f"route / best stay-home (real: {best_real}, sim: {best_sim})", "route", best_real, best_sim,
                      "≤ 0.35 at batch 1"))
    if "route" in real and "pipeline" in real:
        pairs.append(("route / pipeline", "route", "pipeline", "pipeline", "≤ 1.0 at batch 1"))
    if "latency" in real and "eplb" in real:
        pairs.append(("latency / eplb", "latency", "eplb", "eplb", "≤ 0.85 (mean latency)"))
    lines = ["| ratio | ms/token, batch 1: real | simulated | mean latency, Poisson: real | simulated | goal |",
             "|---|---:|---:|---:|---:|---|"]
    for name, a, b_real, b_sim, goal in pairs:
        lines.append(
            f"| {name} | {real[a].ms_per_token_b1 / real[b_real].ms_per_token_b1:.2f} | "
            f"{sim[a].ms_per_token_b1 / sim[b_sim].ms_per_token_b1:.2f} | "
            f"{_mean(real[a].poisson_ms) / _mean(real[b_real].poisson_ms):.2f} | "
            f"{sim[a].poisson_mean_ms / sim[b_sim].poisson_mean_ms:.2f} | {goal} |"
        )
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
