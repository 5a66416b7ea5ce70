"""`prism demo`: start the stack on the demo model, ask every node a few prompts, print the answers
and a summary, stop everything.

    prism demo [--model DIR] [--topology FILE] [--prompts-per-node N] [--max-tokens M] [...]

Default topology: topologies/demo.toml (2 nodes, 3 hosts, 2 ms one way, 500 Mbit/s). Node i gets
domain i of workloads/prompts/ (built-in prompts when those files are missing). Nodes run one
after another, each with its prompts in flight together (continuous batching), so the change in
every host's expert calls (`calls_served` + `direct_calls`) during a node's turn is that node's
traffic. Summary per node:
client-side latency p50/p99, generated tokens/s, the share of expert calls answered by the
node's own hosts (host counters), and the share of (token, expert) calls whose expert the node
holds (the gating's activation reports on `prism.v1.activations.<node>` against the placement).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.up import add_stack_arguments, build_options, fail, run_until_signal

if TYPE_CHECKING:
    from cli.client import PrismClient
    from cli.stack import LocalStack

DEMO_TOPOLOGY = Path(__file__).resolve().parent.parent / "topologies" / "demo.toml"
BUILTIN_PROMPTS: dict[str, list[str]] = {
    "python": ["def fibonacci(n):\n    ", "import os\nimport sys\n\n", "for i in range(10):\n    print("],
    "prose": ["The quick brown fox", "Every node runs the dense part of the model", "Once upon a time"],
    "c": ["#include <stdio.h>\n\nint main(void) {\n", "static int count = 0;\n", "for (int i = 0; i < n; i++) {"],
    "shell": ["#!/bin/sh\nset -e\n", "for f in *.txt; do\n", 'if [ -z "$1" ]; then\n'],
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="start the stack on the demo model, ask each node, summarise, stop")
    add_stack_arguments(p, nodes=2, hosts=2, delay_ms=2.0, demo=True)
    p.add_argument("--prompts-per-node", type=int, default=4, help="prompts sent to each node (default 4)")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens generated per prompt (default 24)")
    p.add_argument(
        "--replan-wait",
        type=float,
        default=30.0,
        help="after round 1, seconds to wait for the re-placement to be applied; 0 = one round only (default 30)",
    )
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from shared.topology import TopologyError

    if not (args.model / "config.json").is_file():
        return fail(
            f"the demo model is not at {args.model} (no config.json); it is built by tools/train_demo.py — "
            "or pass --model DIR with any supported checkpoint"
        )
    if args.topology is None and args.nodes is None:
        args.topology = DEMO_TOPOLOGY
    if not 1 <= args.prompts_per_node <= 64 or not 1 <= args.max_tokens <= 4096:
        return fail("--prompts-per-node must be 1..64 and --max-tokens 1..4096")
    try:
        # Re-plan only when the demo asks (after round 1), and let a small workload justify a move.
        options = build_options(
            args, activation_interval_s=0.5, plan_interval_s=3600.0, migration_cost_calls=1.0, min_window_tokens=0
        )
    except TopologyError as exc:
        return fail(str(exc))
    started = time.perf_counter()
    code: int = run_until_signal(options, lambda stack, stopped: _demo(stack, stopped, args))
    print(f"demo finished in {time.perf_counter() - started:.1f} s (everything is stopped)", file=sys.stderr)
    return code


@dataclass
class NodeRun:
    node: str
    domain: str
    answers: list[tuple[str, str]] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    own_calls: int = 0
    all_calls: int = 0
    errors: list[str] = field(default_factory=list)


def pick_prompts(nodes: list[str], per_node: int) -> dict[str, tuple[str, list[str]]]:
    """Node → (domain, prompts): node i gets domain i (cycling) of workloads/, else built-ins."""
    from shared.workloads import WorkloadError, Workloads

    try:
        workloads = Workloads.load()
        sets = {d: [p.text for p in workloads.prompts(d)] for d in workloads.domains}
    except WorkloadError:
        sets = BUILTIN_PROMPTS
    domains = sorted(sets)
    out = {}
    for i, node in enumerate(nodes):
        domain = domains[i % len(domains)]
        texts = sets[domain]
        out[node] = (domain, [texts[j % len(texts)] for j in range(per_node)])
    return out


async def _demo(stack: LocalStack, stopped: asyncio.Event, args: argparse.Namespace) -> int:
    """Round 1 on the static placement; ask the placement service to re-plan from what round 1
    activated; once the migrator has moved the experts, round 2 with the same prompts."""
    from cli.client import PrismClient

    nodes = [n.name for n in stack.options.topology.nodes]
    prompts = pick_prompts(nodes, args.prompts_per_node)
    async with await PrismClient.connect(stack.hub_url) as client:
        first = await _round(client, stack, prompts, args.max_tokens, stopped)
        _print_answers(first.runs)
        print(f"\nround 1, static placement (epoch {first.epoch}):")
        print(summary_table(first.runs, first.activity, first.placement, stack.options.topology.host_node()))
        failed = any(run.errors for run in first.runs)
        if args.replan_wait <= 0:
            return 1 if failed else 0
        applied, moved = await replan_and_wait(client, args.replan_wait)
        print(f"\nre-placement from round 1's activations: {moved}")
        if applied:
            second = await _round(client, stack, prompts, args.max_tokens, stopped)
            print(f"\nround 2, same prompts after the move (epoch {second.epoch}):")
            print(summary_table(second.runs, second.activity, second.placement, stack.options.topology.host_node()))
            failed = failed or any(run.errors for run in second.runs)
    return 1 if failed else 0


@dataclass
class Round:
    runs: list[NodeRun]
    activity: ActivationTally
    placement: dict[str, list[tuple[int, int]]]
    epoch: int


async def _round(
    client: PrismClient,
    stack: LocalStack,
    prompts: dict[str, tuple[str, list[str]]],
    max_tokens: int,
    stopped: asyncio.Event,
) -> Round:
    """Every node in turn, its prompts in flight together; activation reports tallied meanwhile."""
    from shared import subjects

    epoch, placement = await current_plan(client, stack.placement)
    host_node = stack.options.topology.host_node()
    activity = ActivationTally()
    sub = await client.nc.subscribe(subjects.ALL_ACTIVATIONS, cb=activity.on_report)
    runs = []
    for node, (domain, texts) in prompts.items():
        if stopped.is_set():
            raise KeyboardInterrupt
        run = NodeRun(node, domain)
        await _run_node(client, run, host_node, prompts=texts, max_tokens=max_tokens)
        runs.append(run)
    await asyncio.sleep(stack.options.activation_interval_s + 0.5)  # the last activation report
    await sub.unsubscribe()
    return Round(runs, activity, placement, epoch)


async def current_plan(
    client: Any, fallback: dict[str, list[tuple[int, int]]]
) -> tuple[int, dict[str, list[tuple[int, int]]]]:
    """(epoch, host → experts) of the plan in KV `prism_placement`."""
    from cli.control_plane import read_plan

    plan = await read_plan(client.nc)
    if plan is None:  # no plan yet: the launcher's static placement is what the hosts hold
        return 1, fallback
    return int(plan["epoch"]), {h: [(k[0], k[1]) for k in keys] for h, keys in plan["hosts"].items()}


async def replan_and_wait(client: Any, wait_s: float) -> tuple[bool, str]:
    """Ask the placement service to re-plan now; wait for the migrator to apply it.
    (applied, a line to print)."""
    from nats.errors import NoRespondersError

    from shared import subjects

    events = await client.nc.subscribe(subjects.PLAN_EVENTS)
    try:
        msg = await client.nc.request(subjects.PLACEMENT_CMD, b'{"kind": "replan"}', timeout=wait_s)
        reply = json.loads(msg.data)
        if "error" in reply:
            return False, f"refused: {reply['error']['message']}"
        if not reply["published"]:
            return False, f"none: the migration rule kept epoch {reply['epoch']}"
        async with asyncio.timeout(wait_s):
            while True:
                event = json.loads((await events.next_msg(timeout=wait_s)).data)
                if event["epoch"] == reply["epoch"]:
                    break
    except TimeoutError:
        return False, f"none within {wait_s:g} s"
    except NoRespondersError:
        return False, "none: no placement service answered"
    finally:
        await events.unsubscribe()
    if not event["ok"]:
        return False, f"epoch {reply['epoch']} failed: {event['error']}"
    return True, f"epoch {reply['epoch']} applied in {event['steps']} load/unload steps, while every node kept serving"


async def _run_node(
    client: Any, run: NodeRun, host_node: dict[str, str], *, prompts: list[str], max_tokens: int
) -> None:
    """Send `prompts` to `run.node` all at once; fill `run` with answers, timings and host deltas."""
    from cli.client import InferError

    node = run.node
    before = await host_calls(client, host_node)
    started = time.perf_counter()
    requests = [{"prompt": p, "max_tokens": max_tokens} for p in prompts]
    results = await asyncio.gather(*(client.infer(node, r, timeout_s=120) for r in requests), return_exceptions=True)
    run.wall_s = time.perf_counter() - started
    for prompt, result in zip(prompts, results, strict=True):
        if isinstance(result, InferError):
            run.errors.append(f"{result.code}: {result.message}")
        elif isinstance(result, BaseException):
            raise result
        else:
            run.answers.append((prompt, result.text))
            run.latencies_s.append(result.latency_s)
            run.tokens += len(result.token_ids)
    after = await host_calls(client, host_node)
    delta = {h: after[h] - before[h] for h in after}
    run.own_calls = sum(d for h, d in delta.items() if host_node[h] == node)
    run.all_calls = sum(delta.values())


async def host_calls(client: Any, host_node: dict[str, str]) -> dict[str, int]:
    """Host → expert calls answered (from the bus, and by a direct call for its own gating when it is
    embedded), from each host's `status` command."""
    from shared import subjects

    out = {}
    for host in host_node:
        msg = await client.nc.request(subjects.host_cmd(host), b'{"kind": "status"}', timeout=5)
        status = json.loads(msg.data)
        out[host] = int(status["calls_served"]) + int(status["direct_calls"])
    return out


class ActivationTally:
    """Per node, per (layer, expert): tokens routed, summed over the gating's activation reports."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[tuple[int, int], int]] = {}

    async def on_report(self, msg: Any) -> None:
        from shared.activations import ActivationReport

        report = ActivationReport.decode(msg.data)
        mine = self.counts.setdefault(report.node, {})
        for row, layer in enumerate(report.layers):
            for expert, count in enumerate(report.counts[row].tolist()):
                if count:
                    mine[(layer, expert)] = mine.get((layer, expert), 0) + count

    def local_share(self, node: str, held: set[tuple[int, int]]) -> float | None:
        counts = self.counts.get(node, {})
        total = sum(counts.values())
        return sum(c for k, c in counts.items() if k in held) / total if total else None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary_table(
    runs: list[NodeRun],
    activity: ActivationTally,
    placement: dict[str, list[tuple[int, int]]],
    host_node: dict[str, str],
) -> str:
    """One row per node: answered requests, latency p50/p99 (ms), tokens/s, the two local shares."""
    header = (
        f"{'node':<10} {'domain':<8} {'ok':>4} {'p50 ms':>8} {'p99 ms':>8} {'tok/s':>7} "
        f"{'own-host calls':>17} {'own (token, expert) calls':>26}"
    )
    lines = ["", header, "-" * len(header)]
    for run in runs:
        held = {(k[0], k[1]) for h, keys in placement.items() if host_node[h] == run.node for k in keys}
        token_share = activity.local_share(run.node, held)
        ok = len(run.latencies_s)
        p50 = f"{percentile(run.latencies_s, 50) * 1000:.0f}" if ok else "-"
        p99 = f"{percentile(run.latencies_s, 99) * 1000:.0f}" if ok else "-"
        call_share = f"{run.own_calls / run.all_calls:.0%} of {run.all_calls}" if run.all_calls else "-"
        lines.append(
            f"{run.node:<10} {run.domain:<8} {ok:>4} {p50:>8} {p99:>8} {run.tokens / run.wall_s:>7.1f} "
            f"{call_share:>17} {'-' if token_share is None else f'{token_share:.0%}':>26}"
        )
    lines.append("own-host: answered by a host on the asking node (no network hop); the rest crossed the hub.")
    return "\n".join(lines)


def _print_answers(runs: list[NodeRun]) -> None:
    for run in runs:
        print(f"\n== {run.node} ({run.domain}) ==")
        for prompt, answer in run.answers:
            print(f"  {_one_line(prompt, 50)!s:<52} → {_one_line(answer, 70)}")
        for error in run.errors:
            print(f"  error {error}")


def _one_line(text: str, width: int) -> str:
    flat = json.dumps(text)[1:-1]  # newlines and control characters stay visible and on one line
    return flat if len(flat) <= width else flat[: width - 1] + "…"
