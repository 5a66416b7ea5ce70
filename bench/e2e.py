"""End-to-end benchmark: the real stack per placement policy on the published testbed's shape, against
the simulator's prediction for the same plan.

For each policy the whole stack runs (`cli.stack.LocalStack`: hub, one leaf per node behind its link
emulator, gatings with their embedded expert hosts, placement service, migrator). A warm-up round (every
node's prompts at once) gives the placement service its statistics; it re-plans with the policy and the
migrator applies the plan (for `pipeline` and `route` the gatings then switch to its routes). Measured
after that, on the plan the service published:

- batch 1: each node's prompts one at a time, nodes in turn; ms per generated token = the gating's
  decode time / (tokens - 1) per request, mean over a node's requests, then over nodes;
- Poisson: every node's prompts at once under a seeded Poisson arrival process (`--rate` per node);
  mean and p99 of the request latency the client measures;
- bytes across nodes: what the link emulators carried from the leaves to the hub (every byte that
  leaves a node crosses its own link once), less the idle rate (heartbeats, link probes) measured just
  before (a gating's activation reports, every 0.5 s here, are sent only while it has work: they
  count); at batch 1 from a request's first streamed token to its end, per decode step (no prefill),
  under Poisson per generated token, prefill included;
- the simulator (bench/e2e_sim.py) on the same cluster, routing and plan, and ("+ msg") with a message's
  software time probed on the stack: idle after the rounds for batch 1, during a replay of the Poisson
  round (its own numbers unused) for Poisson; the nodes sharing this machine's cores, a node's hosts on
  its gating's thread; a message's CPU at both ends (the gatings' CPU in the stay-home Poisson rounds
  beyond the compute the simulator books, from /proc) and, under Poisson, the share of the cores the
  other processes left the gatings.

Model: DeepSeek-V2-Lite's structure at tiny widths (27 layers, layer 0 dense, 26 MoE layers × 64 routed
experts, top-6, 2 shared experts, MLA, hidden 64), random weights, fp32. Topology: 3 nodes with 1, 1
and 2 hosts, each host with room for 30% of the experts, links of 2 ms one way at 500 Mbit/s (node to
node through the hub: 4 ms one way; `--delays-ms a,b,c` gives each node its own delay).

Policies run one after the other; two whose ms/token differ by less than the machine's drift between
runs are compared side by side by bench/e2e_paired.py.

    .venv/bin/python bench/e2e.py [--policies eplb,latency,prism,pipeline,route]
                                  [--prompts-per-node 6]
                                  [--max-tokens 12] [--rate 0.5] [--seed 0] [--delays-ms 2,2,2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.e2e_report import ROUTED, print_report  # noqa: E402
from bench.e2e_sim import (  # noqa: E402
    PROBE_EXPERTS,
    SimSetup,
    calibrate,
    message_cpu_s,
    message_time_s,
    predict,
    routing_traces,
    sim_view,
)
from cli.demo import pick_prompts, replan_and_wait  # noqa: E402
from cli.stack import LocalStack, StackOptions  # noqa: E402
from shared.topology import Topology, parse_topology  # noqa: E402

V2_LITE_TINY: dict[str, Any] = {
    "num_hidden_layers": 27,
    "first_k_dense_replace": 1,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_shared_experts": 2,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "hidden_size": 64,
    "moe_intermediate_size": 32,
}
EXPERT_SLOTS_SHARE = 0.30
HOSTS_PER_NODE = {"n0": 1, "n1": 1, "n2": 2}
MAX_BATCH = 32  # the gating's default MAX_BATCH, which the stack runs with
IDLE_S = 2.0
PROBES = 20
"""Expert calls per ordered pair of nodes when measuring a message's software time."""


@dataclass
class Measured:
    """The real stack's numbers for one policy after re-placement."""

    policy: str
    plan: dict[str, Any]
    ms_per_token_b1: float
    hop_ms_per_step_b1: float  # of a step, the time its home waited for other nodes' layers (routes only)
    segment_ms_per_step_b1: float  # of a step, the time other nodes spent running its segments
    bytes_per_token_b1: float
    poisson_ms: list[float]  # client latency per request
    poisson_no_prefill_ms: list[float]  # the gating's total - prefill per request
    bytes_per_token_poisson: float
    errors: list[str]
    probe_extra_s: float  # a remote expert call's time beyond the configured round trip (probe_extra_s), idle
    loaded_extra_s: float  # the same, probed while the Poisson round ran again
    compute_share: float  # of the machine's cores during the Poisson round, what the other processes left the gatings
    gatings_cpu_s: float  # the gatings' CPU seconds during the Poisson round
    links: list[dict[str, Any]] | None = None  # the links the plan was made for (KV `links`: measured ones)


def build_model(workdir: Path) -> Path:
    from tests.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint("deepseek_v2", workdir / "deepseek-v2-lite-tiny", seed=0, **V2_LITE_TINY)


def topology(expert_bytes: int, num_experts: int, delays_ms: list[float]) -> Topology:
    memory_mb = EXPERT_SLOTS_SHARE * num_experts * expert_bytes / 2**20
    nodes = [
        {"name": n, "link": {"delay_ms": delay, "rate_mbit": 500},
         "hosts": [{"name": f"{n}-gpu{i}", "memory_mb": memory_mb} for i in range(k)]}
        for (n, k), delay in zip(HOSTS_PER_NODE.items(), delays_ms, strict=True)
    ]
    return parse_topology({"dtype": "float32", "nodes": nodes}, "bench/e2e.py")


def stack_options(topo: Topology, model: Path, policy: str, run_dir: Path) -> StackOptions:
    """Re-plan only when asked (after the warm-up), from whatever the warm-up saw."""
    return StackOptions(
        topology=topo, model=model, run_dir=run_dir, port=0, mqtt_port=0, http_port=0, api_port=0,
        max_context=256, expert_timeout_s=10.0, activation_interval_s=0.5, policy=policy,
        plan_interval_s=3600.0, migration_cost_calls=0.0, min_window_tokens=0, log_level="warning",
    )


def poisson_arrivals(per_node: int, nodes: int, rate: float, seed: int) -> list[np.ndarray]:
    """Per node, `per_node` arrival times (s from the round's start) of a Poisson process at `rate`/s."""
    rng = np.random.default_rng(seed)
    return [np.cumsum(rng.exponential(1.0 / rate, size=per_node)) for _ in range(nodes)]


class LinkBytes:
    """Bytes the link emulators carried from the leaves to the hub, and the idle rate to subtract."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.idle_Bps = 0.0  # B = bytes

    def now(self) -> tuple[int, float]:
        return sum(link.stats.upstream_bytes for link in self.stack.links.values()), time.perf_counter()

    async def measure_idle(self) -> None:
        start = self.now()
        await asyncio.sleep(IDLE_S)
        self.idle_Bps = self.since(start, idle=False) / IDLE_S

    def since(self, start: tuple[int, float], *, idle: bool = True) -> float:
        """Bytes since `start`, less the idle rate over that time when `idle`."""
        count, at = self.now()
        return count - start[0] - (self.idle_Bps * (at - start[1]) if idle else 0.0)


class CpuTime:
    """CPU seconds the machine and the gatings' processes spent (Linux /proc), to tell how much of the
    machine the other processes (brokers, link emulators, this client, placement, migrator) took."""

    def __init__(self, stack: LocalStack) -> None:
        self.pids = [c.pid for c in stack.supervisor.services if "gating" in c.name and c.pid]
        self.tick = os.sysconf("SC_CLK_TCK")

    def now(self) -> tuple[float, float, float]:
        """(machine busy s, gatings' s, wall s)."""
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
        gatings = 0
        for pid in self.pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            gatings += int(fields[11]) + int(fields[12])  # utime, stime (all threads)
        return (user + nice + system + irq + softirq) / self.tick, gatings / self.tick, time.perf_counter()

    def since(self, start: tuple[float, float, float]) -> tuple[float, float]:
        """(of this machine's cores since `start`, the share the other processes left the gatings; the
        gatings' CPU seconds)."""
        busy, gatings, at = self.now()
        cores = os.cpu_count() or 1
        others = (busy - start[0] - (gatings - start[1])) / max(at - start[2], 1e-9)
        return min(1.0, max(0.1, (cores - others) / cores)), gatings - start[1]


async def measure_policy(
    model: Path, topo: Topology, policy: str, *, prompts: dict[str, list[str]], arrivals: list[np.ndarray],
    args: argparse.Namespace, run_dir: Path,
) -> Measured:
    from cli.client import PrismClient
    from cli.control_plane import read_links

    async with LocalStack(stack_options(topo, model, policy, run_dir)) as stack, \
            await PrismClient.connect(stack.hub_url) as client:
        plan = await warm_up_and_replace(client, policy, prompts, args)
        planned_links = await read_links(client.nc)
        links = LinkBytes(stack)
        await links.measure_idle()
        busy_before = await segment_seconds(client)
        b1_ms, b1_hop_ms, b1_bytes, errors, b1_steps = await batch1_round(client, prompts, args, links)
        b1_segment_ms = 1000 * (await segment_seconds(client) - busy_before) / max(b1_steps, 1)
        cpu = CpuTime(stack)
        cpu_start = cpu.now()
        lat, no_prefill, load_bytes, more = await poisson_round(client, prompts, arrivals, args, links)
        share, gatings_s = cpu.since(cpu_start)
        probes = probe_payloads(topo, plan, hidden_size(model))
        extra_s = await probe_extra_s(stack, topo, probes)
        # the same Poisson round once more, its numbers unused: the probe runs under that load without
        # adding its messages to the measured round's latency and bytes
        replay = asyncio.ensure_future(poisson_round(client, prompts, arrivals, args, links))
        loaded_s = await probe_extra_s(stack, topo, probes, until=replay)
        await replay
    return Measured(policy, plan, b1_ms, b1_hop_ms, b1_segment_ms, b1_bytes, lat, no_prefill, load_bytes,
                    errors + more, extra_s, loaded_s, share, gatings_s, planned_links)


async def warm_up_and_replace(
    client: Any, policy: str, prompts: dict[str, list[str]], args: argparse.Namespace
) -> dict[str, Any]:
    """Every node's prompts at once (the placement service's statistics), then a re-plan with `policy`
    applied by the migrator: the plan it published."""
    from cli.control_plane import read_plan

    await asyncio.gather(*(client.infer(node, _request(p, args), timeout_s=300)
                           for node, texts in prompts.items() for p in texts))
    applied, line = await replan_and_wait(client, 120.0)
    if not applied:
        raise SystemExit(f"{policy}: no re-placement: {line}")
    await asyncio.sleep(1.0)  # the gatings take the applied plan's routes from the same event
    plan = await read_plan(client.nc)
    if plan is None:
        raise SystemExit(f"{policy}: no plan in KV")
    return plan


async def segment_seconds(client: Any) -> float:
    """Seconds every gating has spent running other nodes' segments, from their `$SRV.STATS`."""
    from cli.status import endpoint_data
    from shared import subjects

    replies = await client.gather(f"$SRV.STATS.{subjects.SERVICE_GATING}")
    loads = [endpoint_data(stats, "load") for stats in replies]
    return sum(float(load.get("segment_s", 0.0)) for load in loads if load)


def hidden_size(model: Path) -> int:
    from shared.model.checkpoint import load_config

    return load_config(model).hidden_size


def probe_payloads(topo: Topology, plan: dict[str, Any], hidden_size: int) -> dict[str, tuple[str, bytes]]:
    """Per node, its first host and a batch-1 call's message for it: one row each of `PROBE_EXPERTS`
    experts of one layer that host holds in the plan."""
    import torch

    from shared.codec import encode_tensor

    probes = {}
    for node in topo.nodes:
        host = node.hosts[0].name
        (layer, _), *_ = held = [tuple(key) for key in plan["hosts"][host]]
        experts = [e for held_layer, e in held if held_layer == layer][:PROBE_EXPERTS]
        meta = {"layer": layer, "experts": experts, "counts": [1] * len(experts)}
        probes[node.name] = host, encode_tensor(torch.zeros(len(experts), hidden_size), meta)
    return probes


async def probe_extra_s(
    stack: LocalStack, topo: Topology, probes: dict[str, tuple[str, bytes]], until: asyncio.Future[Any] | None = None
) -> float:
    """What a remote expert call takes beyond its link's configured round trip: from each node's leaf,
    `PROBES` requests to each other node's first host (`probe_payloads`: the host decodes, computes,
    encodes and answers as for a gating); the mean of (round trip - configured round trip): the simulator
    adds it to every message, and a mean latency sums them, tail included. It holds the experts'
    compute, the link emulators' relaying, the brokers on the way and the event loops at both ends. With
    `until`, passes over the pairs repeat until it is done (the probe runs under that load)."""
    import nats

    from shared import subjects

    delay_s = {node.name: node.link.delay_ms / 1000 for node in topo.nodes}
    clients = {a: await nats.connect(url) for a, url in stack.leaf_urls.items()}
    extra: list[float] = []
    try:
        while not extra or (until is not None and not until.done()):
            for a, nc in clients.items():
                for b, (host, payload) in probes.items():
                    if b == a:
                        continue
                    for _ in range(PROBES):
                        started = time.perf_counter()
                        await nc.request(subjects.host_calls(host), payload, timeout=5)
                        extra.append(time.perf_counter() - started - 2 * (delay_s[a] + delay_s[b]))
                        await asyncio.sleep(0.01)
    finally:
        for nc in clients.values():
            await nc.close()
    return statistics.mean(extra)


def _request(prompt: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0.0}


async def batch1_round(
    client: Any, prompts: dict[str, list[str]], args: argparse.Namespace, links: LinkBytes
) -> tuple[float, float, float, list[str], int]:
    """(ms per generated token, of each step the ms its home waited on hops, bytes across per decode step,
    errors, steps run: prefills and decodes) with one request at a time."""
    from cli.client import InferError

    moved, steps, all_steps, per_node, hops_per_node, errors = 0.0, 0, 0, [], [], []
    for node, texts in prompts.items():
        mine, hops = [], []
        for text in texts:
            try:
                final, decode_bytes = await _streamed(client, node, text, args, links)
            except InferError as exc:
                errors.append(f"{node}: {exc}")
                continue
            n = len(final.token_ids)
            all_steps += n
            if n > 1:
                mine.append(1000 * final.timings["decode_s"] / (n - 1))
                hops.append(1000 * final.timings.get("hop_wait_s", 0.0) / n)  # every step, prefill too
                moved, steps = moved + decode_bytes, steps + n - 1
        if mine:
            per_node.append(statistics.mean(mine))
            hops_per_node.append(statistics.mean(hops))
    ms = statistics.mean(per_node) if per_node else float("nan")
    hop_ms = statistics.mean(hops_per_node) if hops_per_node else float("nan")
    return ms, hop_ms, moved / max(steps, 1), errors, all_steps


async def _streamed(
    client: Any, node: str, text: str, args: argparse.Namespace, links: LinkBytes
) -> tuple[Any, float]:
    """One streamed request: its Final and the bytes across from its first token to its end (the decode
    steps, their streamed tokens and the final reply; not the prefill)."""
    from cli.client import Final

    first = None
    async for part in client.stream(node, _request(text, args), idle_timeout_s=300):
        if first is None:
            first = links.now()
        if isinstance(part, Final):
            return part, links.since(first)
    raise RuntimeError("the stream ended without a final reply")


async def poisson_round(
    client: Any, prompts: dict[str, list[str]], arrivals: list[np.ndarray], args: argparse.Namespace,
    links: LinkBytes,
) -> tuple[list[float], list[float], float, list[str]]:
    """(client latencies ms, gating latencies without prefill ms, bytes per generated token, errors)."""
    from cli.client import InferError

    t0 = time.perf_counter()

    async def one(node: str, text: str, at: float) -> Any:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        try:
            return await client.infer(node, _request(text, args), timeout_s=600)
        except InferError as exc:
            return f"{node}: {exc}"

    start = links.now()
    jobs = [one(node, text, float(at)) for (node, texts), times in zip(prompts.items(), arrivals, strict=True)
            for text, at in zip(texts, times, strict=True)]
    results = await asyncio.gather(*jobs)
    moved = links.since(start)
    finals = [r for r in results if not isinstance(r, str)]
    latencies = [1000 * f.latency_s for f in finals]
    no_prefill = [1000 * (f.timings["total_s"] - f.timings["prefill_s"]) for f in finals]
    tokens = sum(len(f.token_ids) for f in finals)
    return latencies, no_prefill, moved / max(tokens, 1), [r for r in results if isinstance(r, str)]


def run_policy(
    model: Path, topo: Topology, policy: str, *, prompts: dict[str, list[str]], arrivals: list[np.ndarray],
    args: argparse.Namespace, work: Path,
) -> Measured:
    """measure_policy, once more when the stack lost a port it had picked to another process (the
    machine is shared: its free port can be taken before a service binds it)."""
    from cli.stack import StackError
    from shared.runtime import run

    for attempt in (1, 2):
        try:
            # On uvloop, as `prism up` runs them: on asyncio's own loop each emulated link delivers
            # about 0.9 ms late (an 8 ms round trip across the hub took 13.1 ms, on uvloop 9.4 ms).
            run_dir = work / f"run-{policy}-{attempt}"
            return run(lambda: measure_policy(model, topo, policy, prompts=prompts, arrivals=arrivals, args=args,
                                              run_dir=run_dir))  # noqa: B023 - called at once, in this iteration
        except StackError as exc:
            if attempt == 2 or "already in use" not in str(exc):
                raise
            print(f"# {policy}: the stack did not start ({exc}); starting it once more", file=sys.stderr)
    raise RuntimeError("unreachable")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--policies", default="eplb,latency,prism,pipeline,route", help="comma separated")
    parser.add_argument("--message-cpu-us", type=float, default=None,
                        help="a message's CPU at each end for the simulator, µs (default: measured on this run's "
                             "stay-home stacks, 0 without one)")
    parser.add_argument("--prompts-per-node", type=int, default=6, help="prompts per node (its own domain)")
    parser.add_argument("--max-tokens", type=int, default=12, help="tokens generated per prompt")
    parser.add_argument("--rate", type=float, default=0.5, help="Poisson arrivals per second per node")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    parser.add_argument("--delays-ms", default="2,2,2", help="each node's one-way delay to the hub, ms")
    args = parser.parse_args()
    args.delays_ms = [float(x) for x in args.delays_ms.split(",")]
    if len(args.delays_ms) != len(HOSTS_PER_NODE) or min(args.delays_ms) < 0:
        parser.error(f"--delays-ms needs {len(HOSTS_PER_NODE)} delays >= 0")
    if args.prompts_per_node < 1 or args.max_tokens < 2 or args.rate <= 0:
        parser.error("need --prompts-per-node >= 1, --max-tokens >= 2 and --rate > 0")
    return args


def main() -> None:
    from shared.model.checkpoint import load_config
    from shared.model.config import list_moe_layers

    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="prism-e2e-"))
    model = build_model(work)
    config = load_config(model)
    moe_layers = list_moe_layers(config)
    expert_bytes = config.expert_nbytes("float32")
    topo = topology(expert_bytes, len(moe_layers) * config.num_experts, args.delays_ms)
    picked = {node: (domain, [t[:48] for t in texts])
              for node, (domain, texts) in pick_prompts(list(HOSTS_PER_NODE), args.prompts_per_node).items()}
    prompts = {node: texts for node, (_, texts) in picked.items()}
    arrivals = poisson_arrivals(args.prompts_per_node, len(prompts), args.rate, args.seed)
    setup = SimSetup(sim_view(topo, expert_bytes), moe_layers, config.num_experts, calibrate(model),
                     *routing_traces(model, picked, args.max_tokens))
    measured = []
    for policy in args.policies.split(","):
        started = time.perf_counter()
        m = run_policy(model, topo, policy, prompts=prompts, arrivals=arrivals, args=args, work=work)
        measured.append(m)
        print(f"# {policy}: {time.perf_counter() - started:.0f} s, epoch {m.plan['epoch']}; batch 1 "
              f"{m.ms_per_token_b1:.1f} ms/token, Poisson mean {statistics.mean(m.poisson_ms or [float('nan')]):.0f} "
              f"ms; compute share under load {m.compute_share:.2f}", file=sys.stderr, flush=True)
    # the same for every stack: a property of the serving code, measured where messages dominate (stay-home)
    cpu_s = statistics.mean([message_cpu_s(setup, m.plan, arrivals, MAX_BATCH, m.gatings_cpu_s)
                             for m in measured if m.policy not in ROUTED] or [0.0])
    if args.message_cpu_us is not None:  # a value measured in an earlier run, for a run of routed stacks only
        cpu_s = args.message_cpu_us / 1e6
    on_this_machine = replace(setup.timing, machine_cores=os.cpu_count() or 1, message_cpu_s=cpu_s,
                              one_thread_per_node=True)  # CPU gatings compute their embedded hosts inline
    predicted, calibrated = [], []
    for m in measured:
        p = predict(setup, m.plan, arrivals, MAX_BATCH)
        message_s = message_time_s(m.probe_extra_s, on_this_machine)
        loaded_s = message_time_s(m.loaded_extra_s, on_this_machine)
        c = predict(replace(setup, timing=replace(on_this_machine, message_time_s=message_s)), m.plan, arrivals,
                    MAX_BATCH, loaded=replace(on_this_machine, message_time_s=loaded_s), loaded_speed=m.compute_share)
        predicted.append(p)
        calibrated.append(c)
        print(f"# {m.policy}: batch 1 {m.ms_per_token_b1:.1f} ms/token (sim {p.ms_per_token_b1:.1f}, + msg "
              f"{c.ms_per_token_b1:.1f}), Poisson mean {statistics.mean(m.poisson_ms or [float('nan')]):.0f} ms "
              f"(sim {p.poisson_mean_ms:.0f}, + msg {c.poisson_mean_ms:.0f}); message {1e3 * message_s:.2f} ms, "
              f"under load {1e3 * loaded_s:.2f} ms; its CPU {1e3 * cpu_s:.3f} ms at each end", file=sys.stderr)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU, fp32, Python {platform.python_version()}"
    print_report(machine, args, setup, measured, predicted, calibrated=calibrated, message_cpu_s=cpu_s)


if __name__ == "__main__":
    main()
