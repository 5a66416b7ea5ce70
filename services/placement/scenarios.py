"""Named simulation scenarios: the published testbed, its regimes, a workload shift, the scaling sweep.

A scenario fixes a model shape, a cluster (hosts, slots, speeds, links), the traffic and the timing.
Placement is computed from a *profile* trace (other requests of the same synthetic world, as the
statistics window of a running system would hold) and simulated on a disjoint *test* trace.

Timing, derived from the shape (edge GPU: ~600 GB/s memory, ~50 TFLOP/s bf16): one expert call reads
its weights once (expert_bytes / 600 GB/s + 10 µs launch) plus 2·params/50 TFLOP/s per token; the dense
part of a layer (attention, router) costs `dense_time_s`, shared experts run locally on top.

Shape legend: N nodes, H hosts, L MoE layers, E experts. Pure numpy; nothing here imports nats.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from services.placement.errors import InvalidInputError
from services.placement.simulator import SimConfig
from services.placement.synthetic import PRESETS, ModelShape, Traffic, generate
from services.placement.traces import RoutingTrace
from services.placement.types import Cluster, Workload

GPU_BYTES_PER_S = 600e9
GPU_FLOPS = 50e12
LAUNCH_S = 10e-6
DENSE_TIME_S = {"deepseek-v2-lite": 150e-6, "mixtral-8x7b": 250e-6, "deepseek-v3": 400e-6}
PUBLISHED_RTT_S = 0.004          # the testbed's round trip is not published; 4 ms as in ARCHITECTURE.md
PUBLISHED_BW_BPS = 500e6 / 8     # 500 Mbit/s
LOCAL_LOAD_BPS = 2e9             # NVMe → GPU when a node keeps the full weights locally
KV_CONTEXT_TOKENS = 2048         # context a request's KV is sized for when a node runs its layers (routes)


@dataclass(frozen=True)
class Regime:
    """Link and batch regime: round trip (s), bandwidth (bytes/s), max batch per node."""

    name: str
    rtt_s: float
    bytes_per_s: float
    max_batch: int


REGIMES: dict[str, Regime] = {
    "rtt-b1": Regime("rtt-b1", 0.004, PUBLISHED_BW_BPS, 1),      # round trips dominate
    "rtt-b8": Regime("rtt-b8", 0.004, PUBLISHED_BW_BPS, 8),
    "bw-b1": Regime("bw-b1", 0.0002, PUBLISHED_BW_BPS, 1),
    "bw-b8": Regime("bw-b8", 0.0002, PUBLISHED_BW_BPS, 8),       # bytes dominate
}


@dataclass(frozen=True)
class Scenario:
    """Everything one simulation needs besides the policy."""

    name: str
    shape: ModelShape
    cluster: Cluster
    profile: RoutingTrace        # statistics the policy sees
    test: RoutingTrace           # what is simulated
    config: SimConfig
    workload: Workload           # what the policies are told about traffic
    note: str = ""


def timing(shape: ModelShape, **overrides: float) -> dict[str, float]:
    """SimConfig timing fields for a model shape (see the module docstring)."""
    params = shape.expert_bytes / shape.bytes_per_element
    out = {
        "dense_time_s": DENSE_TIME_S.get(shape.name, 150e-6),
        "dense_time_per_token_s": 2e-6,
        "expert_time_s": shape.expert_bytes / GPU_BYTES_PER_S + LAUNCH_S,
        "expert_time_per_token_s": 2 * params / GPU_FLOPS,
    }
    out.update(overrides)
    return out


def edge_cluster(shape: ModelShape, memory_share: float, *, rtt_s: float | np.ndarray, bytes_per_s: float,
                 gpus_per_node: tuple[int, ...] = (1, 1, 2), speeds: tuple[float, ...] | None = None) -> Cluster:
    """Nodes with the given GPUs; each GPU holds `memory_share` of all routed experts."""
    slots = round(memory_share * shape.num_layers * shape.num_experts)
    host_node = np.repeat(np.arange(len(gpus_per_node)), gpus_per_node)
    speed = np.ones(host_node.size) if speeds is None else np.asarray(speeds, dtype=np.float64)
    return Cluster(host_node=host_node, host_slots=np.full(host_node.size, slots), host_speed=speed,
                   rtt_s=np.asarray(rtt_s), bandwidth_Bps=np.asarray(bytes_per_s))


def split(trace: RoutingTrace) -> tuple[RoutingTrace, RoutingTrace]:
    """Profile / test halves: alternate requests of each node (profile first)."""
    _, first = np.unique(trace.request, return_index=True)
    req_ids = trace.request[np.sort(first)]                       # request ids in arrival order
    rank = np.empty(int(trace.request.max()) + 1, dtype=np.int64)
    rank[req_ids] = np.arange(req_ids.size)
    node_of = trace.node[np.sort(first)]
    per_node_index = np.zeros(req_ids.size, dtype=np.int64)
    for n in np.unique(node_of):
        per_node_index[node_of == n] = np.arange(int((node_of == n).sum()))
    profile_req = per_node_index % 2 == 0
    mask = profile_req[rank[trace.request]]
    return trace.select(mask), trace.select(~mask)


def arrival_rate(shape: ModelShape, cluster: Cluster, max_batch: int, mean_tokens: float,
                 load: float = 0.5) -> float:
    """Requests/s per node for roughly `load` utilisation of a node that pays one round trip and half
    its calls' bytes per layer (a rough service-time estimate; queueing does the rest)."""
    rtt = float(np.max(cluster.rtt_s))
    bw = float(np.min(cluster.bandwidth_Bps[~np.eye(cluster.num_nodes, dtype=bool)])) if cluster.num_nodes > 1 \
        else np.inf
    t = timing(shape)
    per_layer = rtt + t["dense_time_s"] + 2 * t["expert_time_s"] + max_batch * shape.top_k * shape.bytes_per_token / bw
    step = shape.num_layers * per_layer
    return load * max_batch / (step * mean_tokens)


def build(name: str, shape: ModelShape, cluster: Cluster, traffic: Traffic, *, max_batch: int,
          seed: int = 0, note: str = "", load: float = 0.5) -> Scenario:
    """A scenario from its parts: a trace with twice the requests, split into profile and test."""
    doubled = replace(traffic, requests_per_node=2 * traffic.requests_per_node,
                      shifts=tuple(replace(s, at_request=2 * s.at_request) for s in traffic.shifts))
    profile, test = split(generate(shape, doubled, seed=seed))
    lo, hi = traffic.tokens_per_request
    config = _timing_and_load(shape, cluster, max_batch, (lo + hi) / 2, seed=seed, load=load)
    workload = pilot_workload(shape, cluster, profile, config)
    return Scenario(name=name, shape=shape, cluster=cluster, profile=profile, test=test, config=config,
                    workload=workload, note=note)


def _timing_and_load(shape: ModelShape, cluster: Cluster, max_batch: int, mean_tokens: float, *, seed: int,
                     load: float = 0.5) -> SimConfig:
    rate = arrival_rate(shape, cluster, max_batch, mean_tokens, load)
    t = timing(shape)
    return SimConfig(max_batch=max_batch, arrival_rate=rate, shared_experts=shape.num_shared_experts,
                     expert_bytes=shape.expert_bytes, seed=seed, dense_time_s=t["dense_time_s"],
                     kv_bytes_per_token_layer=shape.kv_bytes_per_token_layer,
                     dense_time_per_token_s=t["dense_time_per_token_s"], expert_time_s=t["expert_time_s"],
                     expert_time_per_token_s=t["expert_time_per_token_s"])


def pilot_workload(shape: ModelShape, cluster: Cluster, profile: RoutingTrace, config: SimConfig) -> Workload:
    """What the policies are told about the traffic: the mean batch per node measured by simulating the
    profile trace with the `eplb` placement (a running system knows its batch sizes), the simulator's
    time of one expert invocation and per token (the Workload's fields, what a live cluster measures:
    services/placement/load.py), and the
    KV a home's batch keeps per layer a node runs for it (KV_CONTEXT_TOKENS per request), in slots;
    the dense part of a layer at that batch (shared experts included), and each home's decode steps per
    second: its arrival rate × the profile's mean tokens per request over its batch (the token rate a
    stable system serves whatever the placement; `route` rehearses it), and that mean itself."""
    from services.placement.policies import get_policy
    from services.placement.simulator import simulate

    batch = np.ones(cluster.num_nodes, dtype=np.int64)
    if config.max_batch > 1:
        placement = get_policy("eplb")(profile.counts(cluster.num_nodes), cluster)
        pilot = simulate(profile, cluster, placement, config)
        batch = np.full(cluster.num_nodes, max(1, round(pilot.mean_batch)), dtype=np.int64)
    B, K = float(batch.mean()), shape.top_k
    kv = float(batch.max()) * KV_CONTEXT_TOKENS * shape.kv_bytes_per_token_layer / shape.expert_bytes
    dense = (config.dense_time_s + B * config.dense_time_per_token_s
             + config.shared_experts * (config.expert_time_s + B * config.expert_time_per_token_s))
    requests = max(len(np.unique(profile.request)), 1)
    per_request = max(profile.num_tokens / requests, 1.0)
    step_rate = config.arrival_rate * per_request / batch.astype(np.float64)
    return Workload(batch=batch, bytes_per_token=shape.bytes_per_token, expert_time_s=config.expert_time_s,
                    expert_time_per_token_s=config.expert_time_per_token_s, top_k=K,
                    kv_slots_per_layer=kv, dense_time_s=dense, step_rate=step_rate, tokens_per_request=per_request)


def published_testbed(model: str, regime: str = "rtt-b8", *, requests_per_node: int = 60, seed: int = 0,
                      purity: float = 0.9) -> Scenario:
    """The published testbed: 3 nodes with 1, 1 and 2 GPUs at 500 Mbit/s; DeepSeek-V2-Lite with
    memory for 30% of the routed experts per GPU, or Mixtral-8x7B with 70%. One domain per node (90%)."""
    if model not in ("deepseek-v2-lite", "mixtral-8x7b"):
        raise InvalidInputError(f"the testbed runs deepseek-v2-lite or mixtral-8x7b, not {model!r}")
    if regime not in REGIMES:
        raise InvalidInputError(f"unknown regime {regime!r}; accepted: {', '.join(REGIMES)}")
    shape, reg = PRESETS[model], REGIMES[regime]
    share = 0.3 if model == "deepseek-v2-lite" else 0.7
    cluster = edge_cluster(shape, share, rtt_s=reg.rtt_s, bytes_per_s=reg.bytes_per_s)
    per_node = requests_per_node if reg.max_batch > 1 else max(requests_per_node // 3, 8)
    traffic = Traffic.dedicated(3, 3, per_node, purity=purity, tokens_per_request=(16, 64))
    return build(f"testbed-{model}-{regime}", shape, cluster, traffic, max_batch=reg.max_batch, seed=seed,
                 note=f"3 nodes (1/1/2 GPUs), {share:.0%} experts per GPU, rtt {reg.rtt_s * 1e3:g} ms, "
                      f"{reg.bytes_per_s * 8 / 1e6:g} Mbit/s, batch <= {reg.max_batch}")


def shift(requests_before: int = 200, seed: int = 0) -> Scenario:
    """The DeepSeek-V2-Lite testbed where every node switches to another domain after
    `requests_before` requests; the profile is the pre-switch workload."""
    shape, reg = PRESETS["deepseek-v2-lite"], REGIMES["rtt-b8"]
    cluster = edge_cluster(shape, 0.3, rtt_s=reg.rtt_s, bytes_per_s=reg.bytes_per_s)
    traffic = Traffic.dedicated(3, 3, 2 * requests_before, purity=0.9, tokens_per_request=(8, 32))
    base = build("shift", shape, cluster, traffic, max_batch=reg.max_batch, seed=seed)
    switched = generate(shape, replace(traffic, shifts=()).with_switch(requests_before, purity=0.9), seed=seed)
    # Every node keeps the full weights on local NVMe (~2 GB/s): over the 500 Mbit/s links, re-placing
    # ~1000 replicas of 17.3 MB would take minutes and the migration rule rejects every plan.
    config = replace(base.config, local_load_bytes_per_s=LOCAL_LOAD_BPS)
    return replace(base, test=switched, config=config,
                   note=f"testbed, each node switches domain after {requests_before} requests; replanning on, "
                        f"replicas load from local storage at {LOCAL_LOAD_BPS / 1e9:g} GB/s")


def sweep_cluster(shape: ModelShape, gpus: int, bytes_per_s: float, seed: int = 0) -> Cluster:
    """`gpus` GPUs on nodes of 1, 1, 2 GPUs (repeating); nodes on a plane 0.5-14.6 ms apart (seeded)."""
    pattern, per_node = [1, 1, 2], list[int]()
    while sum(per_node) < gpus:
        per_node.append(min(pattern[len(per_node) % 3], gpus - sum(per_node)))
    n = len(per_node)
    xy = np.random.default_rng(seed).random((n, 2))
    dist = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    rtt = 0.0005 + 0.01 * dist                                    # 0.5 ms + up to ~14 ms
    return edge_cluster(shape, 0.3, rtt_s=rtt, bytes_per_s=bytes_per_s, gpus_per_node=tuple(per_node))


def sweep(gpus: int, mbit: float, seed: int = 0, requests_per_node: int | None = None) -> Scenario:
    """Scaling sweep point: DeepSeek-V2-Lite, `gpus` GPUs, links of `mbit` Mbit/s, ~240 requests in all
    unless `requests_per_node` says otherwise; 8 domains at most, 90% of a node's requests its own."""
    shape = PRESETS["deepseek-v2-lite"]
    cluster = sweep_cluster(shape, gpus, mbit * 1e6 / 8, seed)
    n = cluster.num_nodes
    per_node = requests_per_node if requests_per_node is not None else max(2, 240 // n)
    traffic = Traffic.dedicated(n, min(n, 8), per_node, purity=0.9, tokens_per_request=(16, 48))
    return build(f"sweep-{gpus}gpu-{mbit:g}mbit", shape, cluster, traffic, max_batch=8, seed=seed,
                 note=f"{n} nodes, {gpus} GPUs, {mbit:g} Mbit/s")


def shape_of(trace: RoutingTrace) -> ModelShape:
    """The ModelShape of a recorded trace: a preset's when the MoE shape matches one (for expert size
    and routing), else the trace's own sizes with expert_bytes from meta.extra or 3·hidden²·dtype."""
    m = trace.meta
    for p in PRESETS.values():
        if (p.num_layers, p.num_experts, p.top_k) == (trace.num_layers, m.num_experts, m.top_k):
            return replace(p, name=m.model, hidden_size=m.hidden_size, num_shared_experts=m.num_shared_experts,
                           bytes_per_element=m.bytes_per_element)
    size = int(m.extra.get("expert_bytes", 3 * m.hidden_size * m.hidden_size * m.bytes_per_element))
    return replace(PRESETS["deepseek-v2-lite"], name=m.model, num_layers=trace.num_layers,
                   num_experts=m.num_experts, top_k=m.top_k, num_shared_experts=m.num_shared_experts,
                   hidden_size=m.hidden_size, bytes_per_element=m.bytes_per_element, expert_bytes=size)


def trace_testbed(trace: RoutingTrace, regime: str = "rtt-b8", memory_share: float = 0.3, seed: int = 0) -> Scenario:
    """The testbed cluster fed by a recorded trace (at most 3 nodes): alternate requests of each node
    form the profile and the test."""
    if trace.num_nodes > 3:
        raise InvalidInputError(f"the testbed has 3 nodes; the trace names {trace.num_nodes}")
    if regime not in REGIMES:
        raise InvalidInputError(f"unknown regime {regime!r}; accepted: {', '.join(REGIMES)}")
    if not 0 < memory_share <= 1:
        raise InvalidInputError(f"memory share must be in (0, 1], got {memory_share}")
    shape, reg = shape_of(trace), REGIMES[regime]
    cluster = edge_cluster(shape, memory_share, rtt_s=reg.rtt_s, bytes_per_s=reg.bytes_per_s)
    if int(cluster.host_slots.sum()) < shape.num_layers * shape.num_experts:
        raise InvalidInputError(f"memory share {memory_share} leaves too few slots for every expert")
    profile, test = split(trace)
    if test.num_tokens == 0:
        raise InvalidInputError("the trace needs at least two requests per node (profile and test)")
    mean_tokens = test.num_tokens / max(len(np.unique(test.request)), 1)
    config = _timing_and_load(shape, cluster, reg.max_batch, mean_tokens, seed=seed)
    workload = pilot_workload(shape, cluster, profile, config)
    return Scenario(name=f"trace-{trace.meta.model}-{regime}", shape=shape, cluster=cluster, profile=profile,
                    test=test, config=config, workload=workload,
                    note=f"recorded trace on the testbed, {memory_share:.0%} experts per GPU, {regime}")
