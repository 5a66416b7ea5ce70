"""The simulator's side of bench/e2e.py: the same cluster, the same routing, the live plan.

- cluster: `prism up`'s topology as the simulator sees it (`cluster_from_launcher`: slots as the
  launcher sizes the hosts; node to node through the hub, so a round trip is 2 × (2 + 2) ms);
- routing: the benchmark's prompts run greedily through the model in this process
  (`cli.trace.record_trace`, batch 1); greedy answers through Prism equal these token for token, so
  this is the routing the real stack saw. Batch 1 (decode time per token) simulates the decode steps
  only; Poisson (whole requests) also each request's prompt, as one prefill step;
- timing: a batch-1 decode step of the same model in this process (1 torch thread, as the services
  run), measured with every expert local and with the routed experts replaced by zeros: the latter
  per MoE layer is the dense part, the difference per (layer, expert) call one expert call;
- placement and routes: the plan the live placement service published (KV `prism_placement`).

Shape legend: L MoE layers, K top-k, E experts, N nodes, H hosts.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from services.gating.engine import ExpertsFn
    from services.placement.planner import ClusterView
    from services.placement.simulator import SimConfig, SimResult
    from services.placement.traces import RoutingTrace
    from services.placement.types import Placement
    from shared.topology import Topology

PROBE_EXPERTS = 2
"""Experts per message-time probe (bench/e2e.py): a batch-1 top-6 call over three nodes sends about two to each."""
FAR_APART_S = 1000.0
"""Spacing of batch-1 arrivals in the simulation: no two requests overlap, as in the real round."""


@dataclass(frozen=True)
class SimSetup:
    """What every prediction of one benchmark run shares."""

    view: ClusterView
    moe_layers: list[int]
    num_experts: int
    timing: SimConfig  # the calibrated times; max_batch and arrivals are set per simulation
    trace: RoutingTrace  # decode steps only, requests numbered node by node in prompt order
    with_prompts: RoutingTrace  # the same requests with their prompts' tokens first
    prompt_len: np.ndarray  # [R] tokens of each request's prompt (its prefill step)


@dataclass(frozen=True)
class Prediction:
    """The simulator's numbers for one plan: batch 1 and under the Poisson arrivals."""

    ms_per_token_b1: float  # mean over nodes of each node's mean over requests
    bytes_per_token_b1: float
    poisson_mean_ms: float
    poisson_p99_ms: float
    bytes_per_token_poisson: float


def message_time_s(probe_extra_s: float, timing: SimConfig) -> float:
    """A message's software time one way, for the simulator: what a probe call took beyond its configured
    round trip, less the compute the simulator books on the host (its experts), halved."""
    return max(0.0, (probe_extra_s - PROBE_EXPERTS * timing.expert_time_s) / 2)


def sim_view(topology: Topology, expert_bytes: int) -> ClusterView:
    """The launcher's cluster with its node and host names, in the order the launcher uses."""
    from services.placement.planner import ClusterView
    from services.placement.topology import cluster_from_launcher

    cluster, nodes = cluster_from_launcher(topology, expert_bytes)
    return ClusterView(cluster, nodes, [host.name for _, host in topology.hosts()])


def placement_of(plan: dict[str, Any], setup: SimSetup) -> Placement:
    """The Placement (with routes) of a published plan, on the simulator's cluster."""
    from services.placement.planner import from_plan_hosts, from_plan_routes
    from services.placement.types import Placement

    placed = from_plan_hosts(plan["hosts"], setup.view, setup.moe_layers, setup.num_experts)
    if placed is None:
        raise RuntimeError(f"the plan names hosts {sorted(plan['hosts'])}, the topology {setup.view.hosts}")
    return Placement(placed.hosts, routes=from_plan_routes(plan.get("routes"), setup.view, setup.moe_layers))


def calibrate(model_dir: Path, steps: int = 32) -> SimConfig:
    """SimConfig timing (s) from batch-1 decode steps of the model in this process: the bare forward with
    every expert local and with none, scaled by what the gating's engine adds per step on top of the bare
    forward (its async expert calls, batching and sampling, spread over the layers); and the fixed work
    of a node per route segment it runs."""
    import torch

    from services.gating.engine import ExpertsResult
    from services.placement.simulator import SimConfig
    from shared.model.model import MoEModel
    from shared.model.moe import LocalExperts, MoECall

    def no_experts(call: MoECall) -> torch.Tensor:
        return torch.zeros_like(call.hidden)

    torch.set_num_threads(1)
    model = MoEModel.from_checkpoint(model_dir)
    experts = LocalExperts.from_checkpoint(model_dir)

    async def answer(call: MoECall, live: torch.Tensor | None) -> ExpertsResult:  # as the gating's ExpertsFn
        return ExpertsResult(experts(call), None)

    full, dense, engine = [], [], []
    for _ in range(3):  # interleaved, so all see the same machine
        full.append(_step_s(model, experts, steps))
        dense.append(_step_s(model, no_experts, steps))
        engine.append(asyncio.run(_engine_step_s(model, answer, steps)))
    cfg = model.config
    layers, k = len(cfg.moe_layers), cfg.top_k
    full_s, dense_s = statistics.median(full), statistics.median(dense)
    serving = max(1.0, statistics.median(engine) / full_s)
    layer_s = serving * full_s / layers
    return SimConfig(dense_time_s=serving * dense_s / layers, dense_time_per_token_s=0.0,
                     expert_time_s=serving * max(full_s - dense_s, 0.0) / (layers * k), expert_time_per_token_s=0.0,
                     segment_time_s=max(0.0, asyncio.run(_segment_s(model, answer, steps)) - layer_s))


async def _engine_step_s(model: Any, experts: ExpertsFn, steps: int) -> float:
    """Mean seconds of a batch-1 decode step through the gating's engine (its experts in this process)."""
    from services.gating.engine import DoneEvent, Engine, Sequence
    from shared.model.sampling import SamplingParams

    engine = Engine(model, experts, max_slots=1, max_len=steps + 16, max_queue=1, inline_max_tokens=64)
    runner = asyncio.create_task(engine.run())
    try:
        times = []
        for _ in range(3):
            seq = Sequence([1, 2, 3, 4], steps + 1, SamplingParams(), stream=False)
            engine.submit(seq)
            while not isinstance(await seq.events.get(), DoneEvent):
                pass
            times.append((seq.finished - seq.first_token) / steps)
        return statistics.median(times)
    finally:
        runner.cancel()


async def _segment_s(model: Any, experts: ExpertsFn, steps: int) -> float:
    """Median seconds a node takes for a one-layer route segment of one sequence: the segment message's
    decode and encode, its KV slot, step context and the layer (bench/e2e.py's stacks run a segment per
    hop into a node that is not the home)."""
    import torch

    from services.gating.routes import Segment
    from services.gating.segments import SegmentRequest, SegmentRunner
    from shared.codec import decode_tensor, encode_tensor

    layer = model.config.moe_layers[0]
    runner = SegmentRunner("x", model, experts, max_slots=1, max_len=steps + 1, idle_ttl_s=3600.0, inline_max_tokens=64)
    x = torch.randn(1, model.config.hidden_size)
    times = []
    for i in range(steps):
        req = SegmentRequest("home", ["home/1"], [1], [i], [Segment(layer, layer + 1, "x")])
        started = time.perf_counter()
        hidden, meta = decode_tensor(encode_tensor(x, {"seqs": req.seqs}))
        out, _ = await runner.run(hidden, req)
        decode_tensor(encode_tensor(out, meta))
        times.append(time.perf_counter() - started)
    runner.close()
    return statistics.median(times[1:])  # the first admits the sequence


def _step_s(model: Any, experts: Callable[[Any], Any], steps: int) -> float:
    """Median seconds of a batch-1 decode step after a short prompt."""
    import torch

    from shared.model.model import Batch

    cache = model.new_cache(1, steps + 8)
    slot = cache.allocate()
    times = []
    with torch.inference_mode():
        model.forward(Batch([slot], [[1, 2, 3, 4]]), cache, experts)
        for i in range(steps):
            t0 = time.perf_counter()
            model.forward(Batch([slot], [[5 + i]]), cache, experts)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def routing_traces(
    model_dir: Path, prompts: dict[str, tuple[str, list[str]]], max_tokens: int
) -> tuple[RoutingTrace, RoutingTrace, np.ndarray]:
    """The routing of the benchmark's prompts, greedy, one request at a time: (decode steps only, every
    token with the prompts', each request's prompt length). Requests are numbered node by node, in
    prompt order."""
    from cli.trace import TraceSettings, record_trace
    from shared.model.tokenizer import Tokenizer
    from shared.workloads import Prompt, Request

    nodes, domains = list(prompts), sorted({domain for domain, _ in prompts.values()})
    requests = [
        Request(node=n, node_name=node, index=j, domain=domain, max_tokens=max_tokens, arrival_s=0.0,
                prompt=Prompt(domain=domain, index=j, text=text, tokens=0, source="bench"))
        for n, (node, (domain, texts)) in enumerate(prompts.items())
        for j, text in enumerate(texts)
    ]
    settings = TraceSettings(max_tokens=max_tokens, temperature=0.0, batch=1)
    trace = record_trace(model_dir, requests, domains, nodes, settings=settings)
    tokenizer = Tokenizer.from_dir(model_dir)
    prompt_len = np.array([len(tokenizer.encode(r.prompt.text)) for r in requests])
    trace = replace(trace, meta=replace(trace.meta, bytes_per_element=4))  # the stack runs fp32
    return trace.select(trace.position >= prompt_len[trace.request]), trace, prompt_len


def predict(
    setup: SimSetup, plan: dict[str, Any], arrivals: list[np.ndarray], max_batch: int,
    loaded: SimConfig | None = None,
) -> Prediction:
    """Simulate the plan at batch 1 (requests far apart, decode steps only: the real number is decode
    time per token) and under `arrivals` (s from the start, one per prompt of each node; each request's
    prompt first, as one prefill step: the real number is the whole request), the latter with `loaded`'s
    timing when given (a message time measured under that load)."""
    from services.placement.simulator import simulate

    placement = placement_of(plan, setup)
    cluster, trace = setup.view.cluster, setup.trace
    per_node = [len(a) for a in arrivals]
    offsets = np.cumsum([0, *per_node])
    ids = _ids_by_node(trace, per_node)  # a prompt whose answer had no decode step is not in `trace`
    apart = [(offsets[n] + np.arange(len(mine))) * FAR_APART_S for n, mine in enumerate(ids)]
    b1 = simulate(trace, cluster, placement, replace(setup.timing, max_batch=1), arrivals=apart)
    everyone = _ids_by_node(setup.with_prompts, per_node)
    timed = [arrivals[n][np.asarray(mine, dtype=np.int64) - offsets[n]] for n, mine in enumerate(everyone)]
    load = simulate(setup.with_prompts, cluster, placement, replace(loaded or setup.timing, max_batch=max_batch),
                    arrivals=timed, prefill=setup.prompt_len)
    return Prediction(
        ms_per_token_b1=1000 * _mean_over_nodes(b1, trace, ids),
        bytes_per_token_b1=b1.bytes_across / max(b1.tokens, 1),
        poisson_mean_ms=1000 * load.mean_latency_s,
        poisson_p99_ms=1000 * load.p99_latency_s,
        bytes_per_token_poisson=load.bytes_across / max(load.tokens, 1),
    )


def _ids_by_node(trace: RoutingTrace, per_node: list[int]) -> list[list[int]]:
    """Per node, the request ids of the trace in order (ids count prompts node by node)."""
    offsets = np.cumsum([0, *per_node])
    present = np.unique(trace.request)
    return [[int(r) for r in present if offsets[n] <= r < offsets[n + 1]] for n in range(len(per_node))]


def _mean_over_nodes(result: SimResult, trace: RoutingTrace, ids: list[list[int]]) -> float:
    """Mean over nodes of the mean over a node's requests of latency / decode steps (s)."""
    steps = np.bincount(trace.request)
    by_node: dict[int, list[float]] = {}
    for node, index, latency in zip(result.request_node, result.request_index, result.latencies_s, strict=True):
        request = ids[int(node)][int(index)]
        by_node.setdefault(int(node), []).append(float(latency) / int(steps[request]))
    return statistics.mean(statistics.mean(v) for v in by_node.values())
