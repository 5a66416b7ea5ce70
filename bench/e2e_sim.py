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
    round trip, less what the simulator books for it on hosts (the experts' compute, the message's CPU
    at both ends), halved."""
    booked = PROBE_EXPERTS * timing.expert_time_s + 2 * timing.message_cpu_s
    return max(0.0, (probe_extra_s - booked) / 2)


def message_cpu_s(
    setup: SimSetup, plan: dict[str, Any], arrivals: list[np.ndarray], max_batch: int, gatings_cpu_s: float
) -> float:
    """CPU per expert message at each end beyond compute: the gatings' CPU seconds in the Poisson round
    less the compute the simulator books for that round, over both ends of its round trips (0 when it
    has none)."""
    load = _poisson(setup, placement_of(plan, setup), arrivals, replace(setup.timing, max_batch=max_batch))
    return max(0.0, gatings_cpu_s - load.compute_s) / (2 * load.round_trips) if load.round_trips else 0.0


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


BATCHES = (1, 4, 8)
"""Decode batches the compute is calibrated at (with one prompt of `PREFILL_TOKENS`): Poisson rounds batch
several requests and start each with its prompt, where time grows with tokens and experts called."""
PREFILL_TOKENS = 24
ENGINE_ROUNDS = 7
"""Rounds of the engine's factor: with 3, and the bare step timed apart from them, the factor moved the
simulated times by 10–20% between runs (docs/benchmarks.md, the seventh and tenth sessions)."""


@dataclass
class _Steps:
    """What the forward passes of one calibration shape did: seconds per step with every expert local and
    with none, and per step the tokens, the expert calls (experts chosen per layer, summed) and rows."""

    full_s: float
    dense_s: float
    tokens: int
    calls: float
    rows: float


def calibrate(model_dir: Path, steps: int = 24) -> SimConfig:
    """SimConfig timing (s) from forward steps of the model in this process (1 torch thread, as the services
    run): decode steps at `BATCHES` and a prefill, with every expert local and with none. Least squares on
    those shapes gives the dense part per layer (fixed + per token) and the experts (per expert call + per
    row); all scaled by what the gating's engine adds per step on top of the bare forward (its async expert
    calls, batching and sampling), measured at batch 1. Also the fixed work of a node per route segment."""
    import torch

    from services.gating.engine import ExpertsResult
    from services.placement.simulator import SimConfig
    from shared.model.model import MoEModel
    from shared.model.moe import LocalExperts, MoECall

    torch.set_num_threads(1)
    model = MoEModel.from_checkpoint(model_dir)
    experts = LocalExperts.from_checkpoint(model_dir)

    async def answer(call: MoECall, live: torch.Tensor | None) -> ExpertsResult:  # as the gating's ExpertsFn
        return ExpertsResult(experts(call), None)

    shapes = [[1] * b for b in BATCHES] + [[PREFILL_TOKENS]]  # tokens per sequence of a step
    measured = [_shape_steps(model, experts, shape, steps) for shape in shapes]
    layers = len(model.config.moe_layers)
    # The engine's factor and a segment's fixed work are ratios and differences of timings (an engine
    # step, the bare forward step, a one-layer segment): each taken within one of ENGINE_ROUNDS
    # interleaved rounds, then the median, so that a slow moment of the machine makes neither.
    rounds = [(asyncio.run(_engine_step_s(model, answer, steps)), _step_s(model, experts, [1], steps),
               asyncio.run(_segment_s(model, answer, steps))) for _ in range(ENGINE_ROUNDS)]
    serving = max(1.0, statistics.median(e / bare for e, bare, _ in rounds))
    segment = statistics.median(seg - e / layers for e, _, seg in rounds)
    dense_fixed, dense_per_token = _fit([(1.0, m.tokens) for m in measured], [m.dense_s / layers for m in measured])
    # what the routed experts add: per layer (sorting the block, combining), per expert call and per row
    per_layer, per_call, per_row = _fit([(1.0, m.calls / layers, m.rows / layers) for m in measured],
                                        [(m.full_s - m.dense_s) / layers for m in measured])
    return SimConfig(
        dense_time_s=serving * (dense_fixed + per_layer), dense_time_per_token_s=serving * dense_per_token,
        expert_time_s=serving * per_call, expert_time_per_token_s=serving * per_row,
        segment_time_s=max(0.0, segment),
    )


def _fit(x: list[tuple[float, ...]], y: list[float]) -> tuple[float, ...]:
    """Non-negative least squares y ≈ Σ c_i·x_i."""
    from scipy.optimize import nnls

    coefficients, _ = nnls(np.array(x, dtype=np.float64), np.array(y, dtype=np.float64))
    return tuple(float(v) for v in coefficients)


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


def _shape_steps(model: Any, experts: Callable[[Any], Any], lengths: list[int], steps: int) -> _Steps:
    """Median step times of one shape, full and dense-only interleaved (so both see the same machine):
    sequences of `lengths` tokens each (a decode batch of ones, or one prompt), after a short prompt; and
    the expert calls and rows of its steps."""
    import torch

    calls, rows = [], []

    def counting(call: Any) -> torch.Tensor:
        chosen = call.expert_ids.reshape(-1)
        calls.append(int(torch.unique(chosen).numel()))
        rows.append(int(chosen.numel()))
        return experts(call)

    def zeros(call: Any) -> torch.Tensor:
        return torch.zeros_like(call.hidden)

    full, dense = [], []
    for _ in range(3):
        full.append(_step_s(model, experts, lengths, steps))
        dense.append(_step_s(model, zeros, lengths, steps))
    _step_s(model, experts, lengths, steps, counted=counting)
    moe_calls = len(calls) / len(model.config.moe_layers)  # the steps counted
    return _Steps(statistics.median(full), statistics.median(dense), sum(lengths),
                  sum(calls) / moe_calls, sum(rows) / moe_calls)


def _step_s(
    model: Any, experts: Callable[[Any], Any], lengths: list[int], steps: int,
    counted: Callable[[Any], Any] | None = None,
) -> float:
    """Median seconds of a forward step over sequences of `lengths` tokens each, after a short prompt:
    decode steps one after the other in one cache; a prompt's step each in a fresh one. `counted`, when
    given, answers the timed steps' expert calls (the prompts' go to `experts`)."""
    import torch

    from shared.model.model import Batch

    prefill = max(lengths) > 1
    cache, slots = None, []
    times = []
    with torch.inference_mode():
        for i in range(steps):
            if cache is None or prefill:
                cache = model.new_cache(len(lengths), steps + max(lengths) + 8)
                slots = [cache.allocate() for _ in lengths]
                model.forward(Batch(slots, [[1, 2, 3, 4]] * len(lengths)), cache, experts)
            tokens = [[5 + (i + j + k) % 50 for k in range(n)] for j, n in enumerate(lengths)]
            t0 = time.perf_counter()
            model.forward(Batch(slots, tokens), cache, counted or experts)
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
    *, loaded: SimConfig | None = None, loaded_speed: float = 1.0,
) -> Prediction:
    """Simulate the plan at batch 1 (requests far apart, decode steps only: the real number is decode
    time per token) and under `arrivals` (s from the start, one per prompt of each node; each request's
    prompt first, as one prefill step: the real number is the whole request), the latter with `loaded`'s
    timing when given (a message time measured under that load) and every host at `loaded_speed` (the
    share of the machine's cores the other processes left the gatings under that load)."""
    from services.placement.simulator import simulate

    placement = placement_of(plan, setup)
    cluster, trace = setup.view.cluster, setup.trace
    per_node = [len(a) for a in arrivals]
    offsets = np.cumsum([0, *per_node])
    ids = _ids_by_node(trace, per_node)  # a prompt whose answer had no decode step is not in `trace`
    apart = [(offsets[n] + np.arange(len(mine))) * FAR_APART_S for n, mine in enumerate(ids)]
    b1 = simulate(trace, cluster, placement, replace(setup.timing, max_batch=1), arrivals=apart)
    load = _poisson(setup, placement, arrivals, replace(loaded or setup.timing, max_batch=max_batch), loaded_speed)
    return Prediction(
        ms_per_token_b1=1000 * _mean_over_nodes(b1, trace, ids),
        bytes_per_token_b1=b1.bytes_across / max(b1.tokens, 1),
        poisson_mean_ms=1000 * load.mean_latency_s,
        poisson_p99_ms=1000 * load.p99_latency_s,
        bytes_per_token_poisson=load.bytes_across / max(load.tokens, 1),
    )


def _poisson(
    setup: SimSetup, placement: Placement, arrivals: list[np.ndarray], timing: SimConfig, speed: float = 1.0
) -> SimResult:
    """The Poisson round: every request with its prompt first, at `arrivals`, every host at `speed`."""
    from services.placement.simulator import simulate

    per_node = [len(a) for a in arrivals]
    offsets = np.cumsum([0, *per_node])
    everyone = _ids_by_node(setup.with_prompts, per_node)
    timed = [arrivals[n][np.asarray(mine, dtype=np.int64) - offsets[n]] for n, mine in enumerate(everyone)]
    cluster = setup.view.cluster
    cluster = replace(cluster, host_speed=cluster.host_speed * speed)
    return simulate(setup.with_prompts, cluster, placement, timing, arrivals=timed, prefill=setup.prompt_len)


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
