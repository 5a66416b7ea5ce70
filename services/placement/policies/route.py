"""`route` (ours): placement and routes chosen together to minimise the expected decode-step time.

Why: with top-k routing nearly every layer of a stay-home step has some remote expert, so the step
pays about one round trip per MoE layer whatever the placement; a pipeline split pays a few one-way
hops instead, but sends every home through every range. `route` lets each home keep the layers it
covers well and send the rest where their experts are (ARCHITECTURE.md, Execution).

Cost: `route_model.RouteModel` (stay-home routes: exactly the `latency` policy's model). Candidates,
each a node view with a route table, each within every node's slots once foreign KV takes
`workload.kv_slots_per_layer` per layer a node runs for another home:
1. stay-home: the `latency` policy's placement (itself the best of every stay-home policy on the
   model), and its view with routes from the route DP (a home may leave for a few layers);
2. the `pipeline` placement exactly as that policy makes it (hosts included, so `route` is never worse
   than it on the model), the same split with hosts balanced as below, and its view with DP routes;
3. whole layers: each node holds whole layers, as many as fit with the others' KV
   (`pipeline.layer_capacity`); which ones is searched on hops and compute alone: circular blocks in
   every node order (up to PERMUTE_NODES nodes) and start layer, then single-layer moves while they
   help, every home's route by DP over (layer, node) with only whole layers allowed. Spare slots take
   each node's most used experts; the routes are then re-solved on the full model.
A routed candidate's replicas are spread over each node's hosts layer by layer, by the work every home
that executes there brings (`_hosts`), and every candidate is costed with its hosts (a layer waits for
the slowest GPU of the node that runs it, `RouteModel.host_work`).
The cheapest candidate, with the migration cost (migration_cost_s per replica `current` lacks), wins;
it replaces `current` only if it saves `min_gain` of current's cost (hysteresis).

The pipeline check: the route model's cost assumes every home steps at once, which over-rates a
multi-GPU node that runs layers for several homes, and it has neither the dense part nor queueing
(`route_model` docstring). So a routed candidate other than the exact pipeline split is taken only if
it also beats the pipeline on the load view: its step alone plus its queueing, with the queueing it
adds over the pipeline's counted twice, must be below the pipeline's step alone plus queueing
(`_beats_pipeline`). The two views are the duty-cycle extremes (every home at once, each home alone,
here with the queueing the homes' step rates imply), and the doubled extra queueing is a margin for
the processor-sharing estimate: a host that serves layers first come first served, gated by the dense
part on a node's first GPU, can wait longer than that estimate. Where the model cannot tell a
candidate from the pipeline within that margin, it takes the pipeline: a candidate that fails the
check keeps its place in the ranking, with the pipeline's placement in it, so whether a routed layout
or staying home wins is still the route model's decision, and only which routed layout is the load
view's. Stay-home candidates are not checked (they run no layer for another home). Ties go to the
earlier candidate, so where nothing beats stay-home the result is the `latency` placement as it is.
Above DP_MAX_NODES nodes the full-model DP (N executing nodes × samples per layer) is skipped: the
whole-layer routes stand as they are. Deterministic.
"""

from __future__ import annotations

from itertools import permutations

import numpy as np

from services.placement.policies._common import assign_to_hosts, fill_spare
from services.placement.policies.latency import latency
from services.placement.policies.pipeline import layer_capacity, pipeline
from services.placement.route_model import RouteModel, shortest_routes
from services.placement.routes import kv_slots
from services.placement.types import Cluster, CoActivation, Placement, Workload, check_inputs

DP_MAX_NODES = 16  # full-model route DP up to this many nodes
PERMUTE_NODES = 5  # every node order of the whole-layer blocks up to this many nodes
SEARCH_PASSES = 3


def _fits(view: np.ndarray, table: np.ndarray | None, slots: np.ndarray, kv: float) -> bool:
    room = slots - kv_slots(table, slots.size, kv)
    return bool(np.all(view.sum(axis=(1, 2)) <= room) and view.any(axis=0).all())


class _WholeLayers:
    """Search over which whole layers each node holds, scored by hops and compute (DP per home)."""

    def __init__(self, model: RouteModel, cap: np.ndarray, num_layers: int) -> None:
        self.cap, self.L = cap, num_layers
        self.hop = model.hop_times()
        own = model.unit_work.sum(axis=2)  # [N_home, L] a home's expert work with every expert local
        self.compute = own[:, None, :] / model.speed[None, :, None]  # [N_home, N_x, L]
        self.weight = model.weight

    def routes(self, held: np.ndarray) -> np.ndarray:
        times = np.where(held[None], self.compute, np.inf)
        return shortest_routes(times, self.hop)

    def score(self, held: np.ndarray) -> float:
        if not held.any(axis=0).all():
            return float("inf")
        table = self.routes(held)
        n = table.shape[0]
        homes = np.arange(n)[:, None]
        path = np.concatenate([homes, table, homes], axis=1)
        hops = self.hop[homes, path[:, :-1], path[:, 1:]].sum(axis=1)
        work = np.take_along_axis(self.compute, table[:, None, :], axis=1)[:, 0].sum(axis=1)
        return float(self.weight @ (hops + work))

    def blocks(self, order: tuple[int, ...], start: int) -> np.ndarray:
        """Circular blocks of each node's capacity, in `order`, from layer `start`."""
        held = np.zeros((self.cap.size, self.L), dtype=bool)
        pos = start
        for n in order:
            k = int(self.cap[n])
            held[n, (pos + np.arange(k)) % self.L] = True
            pos += k
        return held

    def best(self) -> np.ndarray | None:
        n = self.cap.size
        if self.cap.sum() < self.L:
            return None
        orders = list(permutations(range(n))) if n <= PERMUTE_NODES else [tuple(range(n))]
        starts = range(self.L) if n <= DP_MAX_NODES else [0]
        best, best_score = None, float("inf")
        for order in orders:
            for s in starts:
                held = self.blocks(order, s)
                sc = self.score(held)
                if sc < best_score:
                    best, best_score = held, sc
        if best is None:
            return None
        return self.improve(best, best_score) if n <= DP_MAX_NODES else best

    def improve(self, held: np.ndarray, score: float) -> np.ndarray:
        """Move one layer of one node to another layer while that lowers the score."""
        for _ in range(SEARCH_PASSES):
            moved = False
            for n in range(held.shape[0]):
                for a in np.flatnonzero(held[n]):
                    for b in np.flatnonzero(~held[n]):
                        trial = held.copy()
                        trial[n, a], trial[n, b] = False, True
                        sc = self.score(trial)
                        if sc < score - 1e-12:
                            held, score, moved = trial, sc, True
                            break
            if not moved:
                break
        return held


def _candidates(f: np.ndarray, cluster: Cluster, model: RouteModel, coact: CoActivation | None,
                current: Placement | None) -> list[tuple[np.ndarray, np.ndarray | None, Placement | None]]:
    """(view, routes or None, placement if already made) in tie-break order."""
    wl = model.workload
    n_nodes, n_layers, n_experts = f.shape
    slots = cluster.node_slots()
    dp = n_nodes <= DP_MAX_NODES
    base = Placement(current.hosts) if current is not None else None
    home = latency(f, cluster, coact=coact, current=base, workload=wl)
    home_view = home.node_view(cluster)
    out: list[tuple[np.ndarray, np.ndarray | None, Placement | None]] = [(home_view, None, home)]
    pipe = pipeline(f, cluster, workload=wl)  # exactly the baseline, hosts included: never worse than it
    pipe_view, pipe_routes = pipe.node_view(cluster), pipe.route_table(n_nodes)
    out.append((pipe_view, pipe_routes, pipe))
    out.append((pipe_view, pipe_routes, None))  # the same split, hosts by the work routes bring them
    if dp:
        out.append((home_view, model.route_dp(home_view), None))
        out.append((pipe_view, model.route_dp(pipe_view, pipe_routes), None))
    cap = np.minimum(layer_capacity(slots, n_experts, wl.kv_slots_per_layer), n_layers)
    search = _WholeLayers(model, cap, n_layers)
    held = search.best()
    if held is not None:
        coarse = search.routes(held)
        view = np.repeat(held[:, :, None], n_experts, axis=2)
        view = fill_spare(view, f, slots - kv_slots(coarse, n_nodes, wl.kv_slots_per_layer))
        out.append((view, coarse, None))
        if dp:
            out.append((view, model.route_dp(view, coarse), None))
    return out


def _hosts(view: np.ndarray, table: np.ndarray | None, model: RouteModel, f: np.ndarray,
           prefer: np.ndarray | None) -> np.ndarray:
    """[H, L, E] replicas of `view` spread over each node's hosts by the work they will serve. Along
    routes a node computes the calls of every home that executes there, not only its own requests',
    and a layer waits for the slowest of the node's GPUs: so each layer is balanced on its own
    (heaviest expert first to the host with the least work in that layer over its speed; ties to the
    least loaded host overall, then the lower index); a replica `prefer` already places stays."""
    cluster = model.cluster
    if table is None:
        return assign_to_hosts(view, cluster, f, prefer=prefer)
    load = model.served_load(model.serve(view), table)  # [N, L, E]
    hosts = assign_to_hosts(view, cluster, load, prefer=prefer)
    for n in range(cluster.num_nodes):
        members = cluster.hosts_of(n)
        if members.size > 1:
            hosts[members] = _per_layer(view[n], load[n], cluster.host_slots[members], cluster.host_speed[members],
                                        None if prefer is None else prefer[members])
    return hosts


def _per_layer(held: np.ndarray, load: np.ndarray, room: np.ndarray, speed: np.ndarray,
               prefer: np.ndarray | None) -> np.ndarray:
    """[h, L, E] one node's replicas held [L, E] over its h hosts, each layer balanced (see `_hosts`)."""
    out = np.zeros((room.size, *held.shape), dtype=bool)
    room = room.astype(np.int64).copy()
    if prefer is not None:
        stay = prefer & held[None] & (np.cumsum(prefer & held[None], axis=0) == 1)  # one host keeps each
        for k in range(room.size):
            keep = np.argwhere(stay[k])[: room[k]]
            out[k, keep[:, 0], keep[:, 1]] = True
            room[k] -= keep.shape[0]
    total = np.zeros(room.size)
    for lay in range(held.shape[0]):
        acc = (out[:, lay] * load[lay]).sum(axis=1)
        left = np.flatnonzero(held[lay] & ~out[:, lay].any(axis=0))
        for e in left[np.lexsort((left, -load[lay, left]))]:
            key = np.lexsort((np.arange(room.size), total / speed, (acc + load[lay, e]) / speed))
            k = next((int(i) for i in key if room[i] > 0), int(np.argmax(room)))
            out[k, lay, e] = True
            acc[k] += load[lay, e]
            total[k] += load[lay, e]
            room[k] -= 1
    return out


def _load(model: RouteModel, placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """([N_home] step alone with the dense part, [N_home] queueing) of a placement (`RouteModel`)."""
    return model.load_step_times(placement.node_view(model.cluster), placement.routes, placement.hosts)


def _beats_pipeline(model: RouteModel, placement: Placement, pipe_load: tuple[np.ndarray, np.ndarray]) -> bool:
    """True if `placement` beats the pipeline's (alone, queueing) on the load view, its queueing beyond
    the pipeline's counted twice (module docstring)."""
    alone, queue = _load(model, placement)
    extra = np.maximum(queue - pipe_load[1], 0.0)
    ours = float(model.weight @ (alone + queue + extra))
    return ours < float(model.weight @ (pipe_load[0] + pipe_load[1]))


def _pipeline_check(scored: list[tuple[float, Placement]], pipe: Placement | None, model: RouteModel
                    ) -> list[tuple[float, float, Placement]]:
    """(rank, cost, placement) per candidate of `scored` (cost, placement): the pipeline split's placement
    and cost in place of each routed candidate that is cheaper than it on the route model but does not
    beat it on the load view, at that candidate's rank (module docstring). Only the candidates the
    pipeline would otherwise lose to are looked at; stay-home candidates stay."""
    pipe_cost = next((c for c, p in scored if p is pipe), None)
    if pipe is None or pipe_cost is None or model.cluster.num_nodes > DP_MAX_NODES:
        return [(c, c, p) for c, p in scored]
    pipe_load = _load(model, pipe)
    out = []
    for cost, placement in scored:
        keep = (placement is pipe or placement.routes is None or cost >= pipe_cost
                or _beats_pipeline(model, placement, pipe_load))
        out.append((cost, cost, placement) if keep else (cost, pipe_cost, pipe))
    return out


def route(
    freq: np.ndarray,
    cluster: Cluster,
    *,
    coact: CoActivation | None = None,
    current: Placement | None = None,
    workload: Workload | None = None,
) -> Placement:
    """The cheapest (placement, routes) on the route model; see the module docstring. freq [N, L, E]."""
    f = check_inputs(freq, cluster)
    model = RouteModel(cluster, f, coact, workload)
    wl = model.workload
    slots = cluster.node_slots()
    if current is not None and not (current.hosts.shape == (cluster.num_hosts, *f.shape[1:])
                                    and (current.routes is None or current.routes.shape[0] == cluster.num_nodes)):
        current = None  # of another cluster or model shape: ignored
    cur_view = current.node_view(cluster) if current is not None else None
    prefer = current.hosts if current is not None else None
    scored = []
    cands = _candidates(f, cluster, model, coact, current)
    pipe = cands[1][2]  # the exact pipeline split (see _candidates)
    for view, table, made in cands:
        if table is not None and not _fits(view, table, slots, wl.kv_slots_per_layer):
            continue  # (the stay-home candidate always fits: it is a valid `latency` placement)
        placement = made if made is not None else Placement(_hosts(view, table, model, f, prefer),
                                                             routes=table)
        cost = model.cost(placement)
        if cur_view is not None:
            cost += wl.migration_cost_s * float((view & ~cur_view).sum())
        scored.append((cost, placement))
    _, cost, best = min(_pipeline_check(scored, pipe, model), key=lambda c: c[0])  # the first of equal ranks
    if current is not None and not cost < model.cost(current) * (1.0 - wl.min_gain):
        return current
    return best
