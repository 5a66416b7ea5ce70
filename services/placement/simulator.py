"""Trace-driven, event-driven simulator of MoE decoding across nodes for a given expert placement.

Model (ARCHITECTURE.md, "Data flow of one decode step"):
- Requests of the trace arrive at their node as a Poisson process (seeded); each trace token of a
  request is one decode step of it, except that with `prefill` a request's first step runs its
  first `prefill[request]` tokens together (the prompt, in one forward pass).
- Continuous batching: a node runs steps back to back; a step takes every active request (up to
  `max_batch`, admitted at step boundaries in arrival order) one token further (a new one, its prompt).
- Per MoE layer of a step at node n: the dense part (attention, router, shared experts) runs on the
  node's first host; then the step's tokens are grouped by chosen expert. A group whose expert has a
  replica on n is computed by that local host; otherwise it goes to the nearest node holding a
  replica (lowest round trip, then highest bandwidth, then the next index after n cyclically) as one
  message: link delay rtt/2 + bytes / bandwidth (+ message_time_s) there, host compute, the same back. Bytes per message
  = tokens × hidden × dtype bytes + envelope. The groups for one host leave back to back and are
  booked as one block, which is what the gating's one message per host and layer carries (a row per
  (token, expert)); only the envelopes are counted per group.
- Queueing: every host and every directed link is a timeline of busy intervals; a job takes the
  earliest gap at or after its ready time that fits it (FIFO with back-filling, which is what a link
  or a GPU stream does with jobs that become ready at different times). Jobs are booked per layer in
  the order the layers start, so contention between nodes is modelled.
- A layer ends when its slowest group has returned; the next layer starts then.
- Host compute of a group of m tokens: (expert_time_s + m · expert_time_per_token_s) / host speed. With
  `message_cpu_s` a message to a host of another node also costs CPU at both ends: half of it on the
  caller's first host before sending and half after the reply, all of it on the serving host with
  its compute (encoding, decoding, the handler); a route's hop, one message one way, half on the
  sending node's first host and half on the receiving one's. With
  `machine_cores` > 0 every booking of a host's compute also takes one of that many cores for its
  duration (a testbed whose nodes share one machine, as bench/e2e.py's stacks do); with
  `one_thread_per_node` a node's hosts share one timeline (a CPU gating computes its embedded hosts'
  small blocks on its own thread).
- A placement change (migration) takes a share of the bandwidth of every link into a node that
  loads experts, for as long as the weights take at that share; the new placement serves from then.
- Routes (`Placement.routes`): layer l of a step of home n runs on node x = routes[n, l] as above,
  from x (dense part on x's first host, x's own experts as compute only, the rest from the holder
  nearest to x). When the executing node changes, the step's hidden states hop one way (rtt/2 +
  batch × hidden bytes + envelope over the link), and after the last layer they hop back home. A node
  runs other homes' segments (its run of consecutive layers of their route) as the gating's segment
  server does: one batch at a time; when it is free, the oldest segment that has arrived and every
  other of the same layer range that has arrived run together (one dense part per layer for all their
  tokens, an expert's group shared by them), each segment taken in costing `segment_time_s` on its
  first host; the others wait for the next batch. A step keeps the routes it started with. Foreign
  KV: a node running layers for another home holds that home's active requests' KV for them
  (positions so far × layers × kv_bytes_per_token_layer); its peak per node is reported.

Shape legend: T tokens, L MoE layers, K top-k, E experts, N nodes, H hosts, B batch.
Pure numpy and heapq; nothing here imports nats.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from services.placement.errors import InvalidInputError
from services.placement.sim_resources import Timeline, book_on_a_core, serving_hosts, serving_nodes
from services.placement.traces import RoutingTrace
from services.placement.types import Cluster, Placement, validate


@dataclass(frozen=True)
class SimConfig:
    """Timing and load of one simulation; times in seconds at host speed 1.0."""

    max_batch: int = 8                    # requests per decode step per node
    arrival_rate: float = 1.0             # requests per second per node (Poisson)
    dense_time_s: float = 150e-6          # dense part of one layer of one step (attention, router)
    dense_time_per_token_s: float = 2e-6
    expert_time_s: float = 40e-6          # one expert call: weight read + launch
    expert_time_per_token_s: float = 0.5e-6
    shared_experts: int = 0               # computed locally inside the dense part
    envelope_bytes: int = 128             # per message, besides the hidden states
    message_time_s: float = 0.0           # software time of a message one way, beyond link delay and bytes
                                          # (brokers, event loops at both ends); measured per deployment
    segment_time_s: float = 0.0           # an executing node's fixed work per route segment it runs (the
                                          # segment's decode and encode, KV slot, step context), per hop into it
    machine_cores: int = 0                # > 0: every host's compute also takes one of this many cores (a
                                          # testbed whose nodes share one machine); 0: each host its own
    one_thread_per_node: bool = False     # a node's hosts compute one at a time (CPU gatings, whose embedded
                                          # hosts compute small blocks on the gating's thread)
    message_cpu_s: float = 0.0            # CPU a message costs at each end beyond compute (the caller: encode
                                          # before sending, decode after the reply; the host: its handler),
                                          # booked on their hosts' timelines (and cores) like compute
    migration_share: float = 0.5          # share of a link a migration may take
    expert_bytes: int = 17_300_000        # weights moved per replica a migration loads
    local_load_bytes_per_s: float = 0.0           # > 0: nodes load new replicas from local storage at this rate
                                          # (links untouched); 0: over the links from the nearest peer
    kv_bytes_per_token_layer: float = 0.0  # KV cache of one token position in one layer (foreign KV report)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.arrival_rate <= 0 or not 0 < self.migration_share < 1:
            raise InvalidInputError("need max_batch >= 1, arrival_rate > 0 and 0 < migration_share < 1")
        if min(self.dense_time_s, self.dense_time_per_token_s, self.expert_time_s,
               self.expert_time_per_token_s, self.envelope_bytes, self.shared_experts, self.local_load_bytes_per_s,
               self.kv_bytes_per_token_layer, self.message_time_s, self.segment_time_s, self.machine_cores,
               self.message_cpu_s) < 0:
            raise InvalidInputError("SimConfig times and sizes must be >= 0")


@dataclass
class SimResult:
    """What one simulation measured. Calls are (token, expert) pairs; messages are one-way requests
    that crossed nodes (each has a reply); bytes count both directions."""

    requests: int = 0
    tokens: int = 0
    local_calls: int = 0
    remote_calls: int = 0
    messages: int = 0
    bytes_across: float = 0.0
    steps: int = 0
    makespan_s: float = 0.0
    migrations: int = 0
    migrated_replicas: int = 0
    hops: int = 0                         # one-way hops of hidden states between executing nodes
    round_trips: int = 0                  # host messages with their replies (one per remote host and layer)
    host_compute_s: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [H] time each host booked for
                                          # compute (dense parts, experts, segments' fixed work), at its speed;
                                          # messages' CPU not included
    foreign_kv_peak_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [N]
    latencies_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    arrivals_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    request_node: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    request_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # within its node
    events: list[str] = field(default_factory=list)

    @property
    def compute_s(self) -> float:
        """Host time booked for compute, all hosts (`host_compute_s`)."""
        return float(self.host_compute_s.sum())

    @property
    def mean_latency_s(self) -> float:
        return float(self.latencies_s.mean()) if self.latencies_s.size else float("nan")

    @property
    def p99_latency_s(self) -> float:
        return float(np.percentile(self.latencies_s, 99)) if self.latencies_s.size else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.makespan_s if self.makespan_s > 0 else float("nan")

    @property
    def remote_share(self) -> float:
        return self.remote_calls / max(self.local_calls + self.remote_calls, 1)

    @property
    def mean_batch(self) -> float:
        return self.tokens / max(self.steps, 1)


# A controller sees each finished step and may schedule a new placement: (node, experts [B, L, K],
# now, current placement) -> None or (new placement, replicas to load per node [N]).
Controller = Callable[[int, np.ndarray, float, Placement], "tuple[Placement, np.ndarray] | None"]


@dataclass
class _Node:
    """One node's requests and decode loop state."""

    tokens: list[np.ndarray]              # per request (arrival order): trace token indices by position
    arrival: np.ndarray                   # [R] arrival times
    first: list[int] = field(default_factory=list)  # per request: tokens its first step runs together
    next_req: int = 0                     # first request not yet admitted
    active: list[list[int]] = field(default_factory=list)   # [request, next position]
    layer: int = 0
    step: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # token indices
    plan: list[list[tuple[int, int, int]]] = field(default_factory=list)  # per layer: (host, calls, groups)
    execs: list[int] = field(default_factory=list)  # executing node per layer of the current step


class Simulator:
    """One simulation of `trace` on `cluster` starting from `placement`; see the module docstring."""

    def __init__(self, trace: RoutingTrace, cluster: Cluster, placement: Placement, config: SimConfig, *,
                 controller: Controller | None = None, arrivals: list[np.ndarray] | None = None,
                 prefill: np.ndarray | None = None) -> None:
        """`arrivals` (per node, ascending, one per request of that node) replaces the Poisson draw.
        `prefill` (by request id): how many of a request's first tokens its first step runs together
        (its prompt, in one forward pass); None: one token per step from the first."""
        validate(placement, cluster, trace.num_layers, trace.num_experts)
        if trace.num_nodes > cluster.num_nodes:
            raise InvalidInputError(f"trace has {trace.num_nodes} nodes, the cluster {cluster.num_nodes}")
        self.trace, self.cluster, self.cfg, self.controller = trace, cluster, config, controller
        self._activate(placement)
        self.pending: tuple[float, Placement] | None = None
        self.bpt = float(trace.meta.bytes_per_token)
        self.experts = trace.experts.astype(np.int64)
        N, H = cluster.num_nodes, cluster.num_hosts
        self.E, self.H, self.L = trace.num_experts, H, trace.num_layers
        threads = [Timeline() for _ in range(N)]
        self.hosts = ([threads[n] for n in cluster.host_node.tolist()] if config.one_thread_per_node
                      else [Timeline() for _ in range(H)])
        self.cores = [Timeline() for _ in range(config.machine_cores)]
        self.links = [[Timeline() for _ in range(N)] for _ in range(N)]
        self.slow_until = np.zeros((N, N))
        # plain Python lists: the per-layer loop reads them far faster than numpy scalars
        self.first_host = [int(cluster.hosts_of(n)[0]) for n in range(N)]
        self.speed = cluster.host_speed.tolist()
        self.host_node = cluster.host_node.tolist()
        self.half_rtt = (cluster.rtt_s / 2 + config.message_time_s).tolist()  # one way, software included
        self.bw = cluster.bandwidth_Bps.tolist()
        self.migrating = False
        self.prompts = prefill is not None  # a request's first step may run several tokens
        self.nodes = self._nodes(np.random.default_rng(config.seed), arrivals, prefill)
        self.result = SimResult(foreign_kv_peak_bytes=np.zeros(N))
        self.host_compute = [0.0] * H  # SimResult.host_compute_s, kept as floats while running (faster)
        if not self.cores:  # each host its own machine: a booking is its timeline's alone
            self._compute = self._compute_alone  # type: ignore[method-assign]
        self.kv_now = np.zeros((N, N))                          # [home, node] foreign KV bytes held now
        self._done: list[tuple[int, float, float, int]] = []   # (node, arrival, completion, index)
        # each node's segment server: other homes' segments waiting (arrival, home, first layer, end layer),
        # and when the batch it runs ends
        self.segments: list[list[tuple[float, int, int, int]]] = [[] for _ in range(N)]
        self.segments_busy_until = [0.0] * N

    def _nodes(
        self, rng: np.random.Generator, arrivals: list[np.ndarray] | None, prefill: np.ndarray | None
    ) -> list[_Node]:
        t = self.trace
        order = np.lexsort((t.position, t.request))
        req_sorted = t.request[order]
        starts = np.flatnonzero(np.r_[True, req_sorted[1:] != req_sorted[:-1]])
        groups = np.split(order, starts[1:])              # token indices per request, by request id
        first_token = np.array([g[0] for g in groups])
        nodes = []
        for n in range(self.cluster.num_nodes):
            mine = [groups[i] for i in np.argsort(first_token) if t.node[groups[i][0]] == n]
            gaps = rng.exponential(1.0 / self.cfg.arrival_rate, size=len(mine))
            at = np.cumsum(gaps) if arrivals is None else np.asarray(arrivals[n], dtype=np.float64)
            if at.shape != (len(mine),) or np.any(np.diff(at) < 0):
                raise InvalidInputError(f"node {n} has {len(mine)} requests: give as many ascending arrivals")
            first = [1 if prefill is None else max(1, int(prefill[t.request[g[0]]])) for g in mine]
            nodes.append(_Node(tokens=mine, arrival=at, first=first))
        return nodes

    def run(self) -> SimResult:
        heap = [(float(nd.arrival[0]), n) for n, nd in enumerate(self.nodes) if len(nd.tokens)]
        heapq.heapify(heap)
        while heap:
            now, n = heapq.heappop(heap)
            if self.pending is not None and now >= self.pending[0]:
                self._activate(self.pending[1])
            events = self._serve_segments(-1 - n, now) if n < 0 else self._event(n, now)
            for event in events:  # (time, node), or (time, -1 - node) for a node's segment server
                heapq.heappush(heap, event)
        done = sorted(self._done, key=lambda d: d[1])
        r = self.result
        r.requests = len(done)
        r.host_compute_s = np.array(self.host_compute)
        r.request_node = np.array([d[0] for d in done], dtype=np.int64)
        r.request_index = np.array([d[3] for d in done], dtype=np.int64)
        r.arrivals_s = np.array([d[1] for d in done])
        r.latencies_s = np.array([d[2] - d[1] for d in done])
        if done:
            r.makespan_s = max(d[2] for d in done) - min(d[1] for d in done)
        return r

    def _event(self, n: int, now: float) -> list[tuple[float, int]]:
        """Run the next layer of node n (starting a step if needed); return the next event: n's own, or,
        when the step's next layers run on another node x, x's segment server's (time, -1 - x)."""
        nd = self.nodes[n]
        if nd.layer == 0:
            while (nd.next_req < len(nd.tokens) and nd.arrival[nd.next_req] <= now
                   and len(nd.active) < self.cfg.max_batch):
                nd.active.append([nd.next_req, 0])
                nd.next_req += 1
            if not nd.active:
                self.kv_now[n] = 0.0                            # finished requests free their KV
                return [(float(nd.arrival[nd.next_req]), n)] if nd.next_req < len(nd.tokens) else []
            if self.prompts:
                nd.step = np.concatenate([nd.tokens[r][p:p + (nd.first[r] if p == 0 else 1)] for r, p in nd.active])
            else:  # one token each: the common case, kept fast
                nd.step = np.array([nd.tokens[r][p] for r, p in nd.active], dtype=np.int64)
            nd.execs = self.routes[n].tolist()
            nd.plan = self._group(nd.step, self.routes[n])
            self._foreign_kv(n, nd)
        x = nd.execs[nd.layer]
        prev = nd.execs[nd.layer - 1] if nd.layer else n
        ready = self._hop(prev, x, nd.step.size, now) if x != prev else now
        if x != n:  # another node's layers: they wait in its segment server's queue
            end_layer = nd.layer + 1
            while end_layer < self.L and nd.execs[end_layer] == x:
                end_layer += 1
            self.segments[x].append((ready, n, nd.layer, end_layer))
            return [(max(ready, self.segments_busy_until[x]), -1 - x)]
        end = self._layer(x, nd.plan[nd.layer], nd.step.size, ready, now)
        nd.layer += 1
        if nd.layer == self.L:
            nd.layer = 0
            self._finish_step(n, nd, end)
        return [(end, n)]

    def _serve_segments(self, x: int, now: float) -> list[tuple[float, int]]:
        """Node x's segment server at `now`, as a gating serves other homes' segments: when idle, the
        oldest segment that has arrived and every other of its layer range that has arrived run as one
        batch (one dense part per layer, an expert's group shared by their tokens), the next batch after
        it. The events to push: the homes' (their steps go on when the batch ends) and its own."""
        queue = self.segments[x]
        if not queue or self.segments_busy_until[x] > now:
            return []  # idle, or the running batch's end is an event already
        arrived = [s for s in queue if s[0] <= now]
        if not arrived:
            return [(min(s[0] for s in queue), -1 - x)]
        span = min(arrived)[2:]
        batch = [s for s in arrived if s[2:] == span]
        self.segments[x] = [s for s in queue if s not in batch]
        homes = [s[1] for s in batch]
        step = np.concatenate([self.nodes[h].step for h in homes])
        first, stop = span
        plan = self._group(step, np.full(stop - first, x), first)  # the span's layers only
        end = now
        for layer in range(first, stop):  # each segment taken in costs its fixed work before the first
            extra = self.cfg.segment_time_s * len(batch) if layer == first else 0.0
            end = self._layer(x, plan[layer - first], step.size, end, now, extra)
        self.segments_busy_until[x] = end
        events = [(end, -1 - x)] if self.segments[x] else []
        for h in homes:
            nd = self.nodes[h]
            nd.layer = stop
            if stop == self.L:  # back home for the head
                nd.layer = 0
                back = self._hop(x, h, nd.step.size, end, now)
                self._finish_step(h, nd, back)
                events.append((back, h))
            else:
                events.append((end, h))
        return events

    def _hop(self, a: int, b: int, batch: int, ready: float, now: float | None = None) -> float:
        """The step's hidden states from node a to node b, one way; returns their arrival. With
        `message_cpu_s`, a hop is one message: half of it on a's first host before sending, half on b's
        on arrival (a round trip, two messages, books it whole at each end)."""
        size = batch * self.bpt + self.cfg.envelope_bytes
        self.result.hops += 1
        self.result.bytes_across += size
        now = ready if now is None else now
        half_cpu = self.cfg.message_cpu_s / 2
        sender, receiver = self.first_host[a], self.first_host[b]
        if half_cpu:
            ready = self._compute(sender, ready, half_cpu / self.speed[sender], now)
        arrival = self._send(a, b, ready, size, now) + self.half_rtt[a][b]
        if half_cpu:
            arrival = self._compute(receiver, arrival, half_cpu / self.speed[receiver], now)
        return float(arrival)

    def _foreign_kv(self, n: int, nd: _Node) -> None:
        """Foreign KV of home n's active requests on each node of its route; keeps the peak per node."""
        if self.cfg.kv_bytes_per_token_layer <= 0 or self.placement.routes is None:
            return
        positions = sum(p + 1 for _, p in nd.active)
        layers = np.bincount(self.routes[n], minlength=self.kv_now.shape[0]).astype(np.float64)
        layers[n] = 0.0
        self.kv_now[n] = layers * positions * self.cfg.kv_bytes_per_token_layer
        res = self.result
        res.foreign_kv_peak_bytes = np.maximum(res.foreign_kv_peak_bytes, self.kv_now.sum(axis=0))

    def _finish_step(self, n: int, nd: _Node, end: float) -> None:
        self.result.steps += 1
        self.result.tokens += len(nd.active)
        still = []
        for r, p in nd.active:
            q = p + (nd.first[r] if p == 0 else 1)
            if q < len(nd.tokens[r]):
                still.append([r, q])
            else:
                self._done.append((n, float(nd.arrival[r]), end, r))
        nd.active = still
        if self.controller is not None and self.pending is None:
            plan = self.controller(n, self.experts[nd.step], end, self.placement)
            if plan is not None:
                self._migrate(plan[0], plan[1], end)

    def _group(self, step: np.ndarray, execs: np.ndarray, start: int = 0) -> list[list[tuple[int, int, int]]]:
        """For each of the layers start, start + 1, ... that execs [L'] gives the executing node of: the
        (host, calls, groups) per host a step's tokens need there, local hosts too; a group is the tokens
        of one expert (one message). Counted per (layer, expert), then summed per (layer, host) through
        the serving host of each (layer, expert) for these executing nodes (`_host_index`)."""
        L, E, H = execs.size, self.E, self.H
        index, offsets = self._host_index(execs, start)
        chosen = (self.experts[step, start:start + L] + offsets).ravel()   # [B·L'·K] layer·E + expert
        per_expert = np.bincount(chosen, minlength=L * E)                  # [L'·E] calls of each expert
        calls = np.bincount(index, weights=per_expert, minlength=L * H).reshape(L, H)
        groups = np.bincount(index, weights=per_expert > 0, minlength=L * H).reshape(L, H)
        nz_l, nz_h = np.nonzero(calls)
        plan: list[list[tuple[int, int, int]]] = [[] for _ in range(L)]
        for layer, h, m, g in zip(nz_l.tolist(), nz_h.tolist(), calls[nz_l, nz_h].astype(np.int64).tolist(),
                                  groups[nz_l, nz_h].astype(np.int64).tolist(), strict=True):
            plan[layer].append((h, m, g))
        return plan

    def _host_index(self, execs: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
        """([L'·E] layer·H + serving host of each (layer, expert) of layers start.. run on execs, [L', 1]
        layer·E offsets); the same for every step of a route until the placement changes (`_activate`)."""
        key = (execs.tobytes(), start)
        if key not in self._host_indices:
            L = execs.size
            lay = np.arange(L)[:, None]
            host = self.serve_host[execs[:, None], lay + start, np.arange(self.E)[None, :]]  # [L', E]
            self._host_indices[key] = ((lay * self.H + host).ravel(), lay * self.E)
        return self._host_indices[key]

    def _layer(  # noqa: PLR0917 - one layer's booking
        self, n: int, plan: list[tuple[int, int, int]], batch: int, ready: float, now: float, extra_s: float = 0.0
    ) -> float:
        """Book one layer of a step on its executing node n from `ready`; return when its slowest group
        is back. `extra_s`: work on n's first host before the dense part (a segment's fixed work).

        Groups going to one host are booked together: their link transfer as one block (the
        messages leave back to back) and their compute as one block (the host runs them in a row)."""
        cfg = self.cfg
        dense = cfg.dense_time_s + batch * cfg.dense_time_per_token_s
        dense += cfg.shared_experts * (cfg.expert_time_s + batch * cfg.expert_time_per_token_s) + extra_s
        h0 = self.first_host[n]
        t0 = self._compute(h0, ready, dense / self.speed[h0], now)
        end, res, booked = t0, self.result, self.host_compute
        booked[h0] += dense / self.speed[h0]
        cpu = cfg.message_cpu_s
        for h, m, g in plan:
            work = (g * cfg.expert_time_s + m * cfg.expert_time_per_token_s) / self.speed[h]
            booked[h] += work
            node = self.host_node[h]
            if node == n:
                res.local_calls += m
                end = max(end, self._compute(h, t0, work, now))
                continue
            res.remote_calls += m
            res.messages += g
            res.round_trips += 1
            size = m * self.bpt + g * cfg.envelope_bytes
            res.bytes_across += 2 * size
            half = self.half_rtt[n][node]
            sent = self._compute(h0, t0, cpu / 2 / self.speed[h0], now) if cpu else t0
            there = self._send(n, node, sent, size, now) + half
            done = self._compute(h, there, work + cpu / self.speed[h], now)
            back = self._send(node, n, done, size, now) + half
            end = max(end, self._compute(h0, back, cpu / 2 / self.speed[h0], now) if cpu else back)
        return end

    def _compute(self, h: int, ready: float, work: float, now: float) -> float:
        return book_on_a_core(self.hosts[h], self.cores, ready, work, now)

    def _compute_alone(self, h: int, ready: float, work: float, now: float) -> float:
        return self.hosts[h].book(ready, work, now)

    def _send(self, a: int, b: int, ready: float, size: float, now: float) -> float:
        bw = self.bw[a][b]
        if self.migrating and ready < self.slow_until[a, b]:
            bw *= 1.0 - self.cfg.migration_share
        return self.links[a][b].book(ready, size / bw, now)

    def _migrate(self, placement: Placement, loads: np.ndarray, now: float) -> None:
        """Start loading `loads[m]` replicas into each node m; the plan serves once all are loaded."""
        cl, cfg = self.cluster, self.cfg
        finish = now
        for m in np.flatnonzero(loads > 0):
            if cfg.local_load_bytes_per_s > 0:
                finish = max(finish, now + loads[m] * cfg.expert_bytes / cfg.local_load_bytes_per_s)
                continue
            peers = [k for k in range(cl.num_nodes) if k != m]
            bw_in = max((cl.bandwidth_Bps[k, m] for k in peers), default=np.inf)
            took = loads[m] * cfg.expert_bytes / (cfg.migration_share * bw_in)
            for k in peers:
                self.slow_until[k, m] = max(self.slow_until[k, m], now + took)
            self.migrating = True
            finish = max(finish, now + took)
        self.pending = (finish, placement)
        self.result.migrations += 1
        self.result.migrated_replicas += int(loads.sum())
        self.result.events.append(f"migration decided at {now:.2f}s, serving from {finish:.2f}s "
                                  f"({int(loads.sum())} replicas)")

    def _activate(self, placement: Placement) -> None:
        self.placement, self.serve_host = placement, serving_hosts(placement, self.cluster)
        self.routes = placement.route_table(self.cluster.num_nodes)
        self._host_indices: dict[tuple[bytes, int], tuple[np.ndarray, np.ndarray]] = {}
        self.pending = None


def simulate(trace: RoutingTrace, cluster: Cluster, placement: Placement, config: SimConfig, *,
             controller: Controller | None = None, arrivals: list[np.ndarray] | None = None,
             prefill: np.ndarray | None = None) -> SimResult:
    """Run one simulation; see `Simulator`."""
    return Simulator(trace, cluster, placement, config, controller=controller, arrivals=arrivals,
                     prefill=prefill).run()


__all__ = ["Controller", "SimConfig", "SimResult", "Simulator", "Timeline", "serving_hosts", "serving_nodes",
           "simulate"]
