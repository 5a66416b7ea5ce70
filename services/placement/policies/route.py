"""`route` (ours): placement and routes chosen together to minimise the expected decode-step time.

Why: with top-k routing nearly every layer of a stay-home step has some remote expert, so a step pays
about one round trip per MoE layer whatever the placement; a pipeline split pays a few one-way hops
instead, but sends every home through every range. `route` lets each home keep the layers it covers
well and send the rest where their experts are (ARCHITECTURE.md, Execution).

Candidates (`_candidates`, in tie-break order), each a node view with a route table that fits every
node's slots once foreign KV takes `workload.kv_slots_per_layer` per layer a node runs for another home:
1. stay-home: the `latency` placement, the same experts spread over each node's GPUs layer by layer,
   and its view with DP routes (a home may leave for a few layers); `eplb`'s placement;
2. the `pipeline` placement exactly (so `route` is never worse than it where it chooses), the same split
   with its hosts balanced, and its view with DP routes;
3. whole layers: each node holds whole layers (`_WholeLayers`: circular blocks in every node order, up
   to PERMUTE_NODES nodes, and start layer, then single-layer moves, scored on hops and compute), spare
   slots for each node's most used other experts, routes by DP on the full model;
4. with a rehearsal, on up to SPLIT_MAX_NODES nodes, the pipeline's split moved a layer at a time
   between neighbouring stages while the rehearsal says it pays (`_moved_split`): hops and compute rate
   every split of one node order alike, but a 2-GPU node, whose first GPU runs every dense part, may
   serve best with more or fewer layers.
A routed candidate's replicas are spread over each node's hosts layer by layer, by the work every home
executing there brings (`_hosts`): a layer waits for the node's slowest GPU.

Choice (`_choose`): the route model's step-together cost suits the search, but it charges a node that
runs layers for several homes as if their steps always arrived together. So candidates are ranked on
the load view (`RouteModel.view_costs`) plus their migration cost: the rehearsal (`rehearsal.py`: the
simulator on a sample of the traffic) where the homes' step rates are known, else each home's step
alone with its dense part. Before that, the row view (each sampled batch paying for the experts it
calls, plus processor-sharing queueing) rules out every candidate more than ROW_MARGIN above the lowest;
one that far above the pipeline's is not even rehearsed. A routed layout other than the pipeline split
must beat the pipeline by ROUTED_MIN_GAIN: within that the views cannot tell layouts apart. Ties go to
the earlier candidate; `current` stays unless the choice saves `min_gain` of its cost
(`route_model.replaces`, the migration rule's test too). The measurements behind each of these, and
what was tried instead: docs/benchmarks.md.

Scale: above SPLIT_MAX_NODES nodes the split is not moved (up to 6(S-1) rehearsals for S stages, which
paid in none of the measured cells of 4-12 nodes); above DP_MAX_NODES nodes the full-model route DP is
skipped (the whole-layer routes stand);
above LOAD_VIEW_MAX_NODES (`route_model`) both views are the row view without queueing. Deterministic.
"""

from __future__ import annotations

from itertools import permutations

import numpy as np

from services.placement.policies._common import assign_to_hosts, fill_spare
from services.placement.policies.eplb import eplb
from services.placement.policies.latency import latency
from services.placement.policies.pipeline import layer_capacity, pipeline
from services.placement.route_model import ROW_MARGIN, RouteModel, replaces, shortest_routes
from services.placement.routes import kv_slots, stay_home
from services.placement.types import Cluster, CoActivation, Placement, Workload, check_inputs

DP_MAX_NODES = 16  # full-model route DP up to this many nodes
PERMUTE_NODES = 5  # every node order of the whole-layer blocks up to this many nodes
SEARCH_PASSES = 3
ROUTED_MIN_GAIN = 0.01  # a routed layout other than the pipeline split must beat it by this on the load view
SPLIT_ROUNDS = 3  # rounds of moving the pipeline's split by a layer, judged by the rehearsal
SPLIT_MAX_NODES = 3  # ... on clusters of up to this many nodes


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
        """[..., N_home, L] every home's route over the whole layers `held` [..., N, L] holds."""
        times = np.where(held[..., None, :, :], self.compute, np.inf)
        return shortest_routes(times, self.hop)

    def score(self, held: np.ndarray) -> float:
        """Σ_h w_h (hops + compute) of home h's cheapest route over the whole layers `held` [N, L]."""
        return float(self.scores(held[None])[0])

    def scores(self, helds: np.ndarray) -> np.ndarray:
        """[T] the score of each layout of helds [T, N, L] (inf where some layer has no node)."""
        out = np.full(helds.shape[0], np.inf)
        ok = np.all(np.any(helds, axis=1), axis=1)
        if not ok.any():
            return out
        table = self.routes(helds[ok])  # [T', H, L]
        n = table.shape[1]
        homes = np.arange(n)[:, None]
        ends = np.broadcast_to(homes, (table.shape[0], n, 1))
        path = np.concatenate([ends, table, ends], axis=2)
        hops = self.hop[homes, path[..., :-1], path[..., 1:]].sum(axis=2)
        work = self.compute[homes, table, np.arange(self.L)].sum(axis=2)
        out[ok] = [float(self.weight @ row) for row in hops + work]  # one dot each: a layout alone sums alike
        return out

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
        """Move one layer of one node to another layer while that lowers the score (for each held layer,
        the first place that helps, all places scored at once)."""
        for _ in range(SEARCH_PASSES):
            moved = False
            for n in range(held.shape[0]):
                for a in np.flatnonzero(held[n]):
                    to = np.flatnonzero(~held[n])
                    trials = np.repeat(held[None], to.size, axis=0)
                    trials[:, n, a] = False
                    trials[np.arange(to.size), n, to] = True
                    sc = self.scores(trials)
                    better = np.flatnonzero(sc < score - 1e-12)
                    if better.size:
                        held, score, moved = trials[better[0]], float(sc[better[0]]), True
            if not moved:
                break
        return held


def _candidates(f: np.ndarray, cluster: Cluster, model: RouteModel, coact: CoActivation | None,
                current: Placement | None
                ) -> tuple[list[tuple[np.ndarray, np.ndarray | None, Placement | None]], Placement]:
    """([(view, routes or None, placement if already made)] in tie-break order, the exact pipeline split)."""
    wl = model.workload
    n_nodes, n_layers, n_experts = f.shape
    slots = cluster.node_slots()
    dp = n_nodes <= DP_MAX_NODES
    base = Placement(current.hosts) if current is not None else None
    home = latency(f, cluster, coact=coact, current=base, workload=wl)
    home_view = home.node_view(cluster)
    out: list[tuple[np.ndarray, np.ndarray | None, Placement | None]] = [(home_view, None, home)]
    out.append((home_view, None, None))  # its experts, each layer spread over a node's GPUs by its work
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
        view = _whole_layer_view(held, coarse, f, slots, wl.kv_slots_per_layer)
        out.append((view, coarse, None))
        if dp:
            out.append((view, model.route_dp(view, coarse), None))
    balanced = eplb(f, cluster, workload=wl)
    out.append((balanced.node_view(cluster), None, balanced))
    return out, pipe


def _whole_layer_view(held: np.ndarray, table: np.ndarray, f: np.ndarray, slots: np.ndarray, kv: float) -> np.ndarray:
    """[N, L, E] every expert of the layers each node holds (held [N, L]), and in the slots left once
    the other homes' KV along `table` is charged, each node's most used other experts."""
    view = np.repeat(held[:, :, None], f.shape[2], axis=2)
    return fill_spare(view, f, slots - kv_slots(table, held.shape[0], kv))


def _split_layout(order: list[int], counts: list[int], f: np.ndarray, model: RouteModel,
                  prefer: np.ndarray | None) -> Placement | None:
    """A pipeline-like layout: nodes `order` run `counts` contiguous layers each, every home along them,
    each node holding every expert of its layers and its most used others in spare slots; None when it
    does not fit with the other homes' KV."""
    cluster, kv = model.cluster, model.workload.kv_slots_per_layer
    n_nodes, n_layers, _ = f.shape
    held = np.zeros((n_nodes, n_layers), dtype=bool)
    bounds = np.cumsum([0, *counts])
    for node, start, end in zip(order, bounds[:-1], bounds[1:], strict=True):
        held[node, start:end] = True
    table = np.repeat(np.argmax(held, axis=0)[None], n_nodes, axis=0)
    slots = cluster.node_slots()
    view = _whole_layer_view(held, table, f, slots, kv)
    if not _fits(view, table, slots, kv):
        return None
    return Placement(_hosts(view, table, model, prefer), routes=table)


def _moved_split(pipe: Placement, f: np.ndarray, model: RouteModel, prefer: np.ndarray | None) -> Placement | None:
    """The pipeline's node order with its layer counts moved one layer between neighbouring stages at a
    time, while that lowers the rehearsal (SPLIT_ROUNDS rounds, every single move of a round tried); the
    best layout found, or None when no move paid. Only with a rehearsal: hops and compute alone score
    every split of one order alike, and a split by memory leaves a 2-GPU node, whose first GPU runs
    every dense part, more or fewer layers than it serves best."""
    path = pipe.route_table(model.cluster.num_nodes)[0]
    order = [int(n) for i, n in enumerate(path) if i == 0 or n != path[i - 1]]
    if len(order) < 2 or len(set(order)) < len(order):
        return None  # one stage, or a node visited twice: not a split by contiguous ranges
    cap = np.minimum(layer_capacity(model.cluster.node_slots(), f.shape[2], model.workload.kv_slots_per_layer),
                     f.shape[1])
    counts = [int((path == n).sum()) for n in order]
    best, best_cost = None, model.load_cost(pipe)
    for _ in range(SPLIT_ROUNDS):
        found = None
        for i in range(len(order) - 1):
            for give, take in ((i, i + 1), (i + 1, i)):
                moved = list(counts)
                moved[give] -= 1
                moved[take] += 1
                if moved[give] < 1 or moved[take] > cap[order[take]]:
                    continue
                layout = _split_layout(order, moved, f, model, prefer)
                cost = model.load_cost(layout) if layout is not None else np.inf
                if cost < best_cost:
                    found, best, best_cost = moved, layout, cost
        if found is None:
            break
        counts = found
    return best


def _hosts(view: np.ndarray, table: np.ndarray | None, model: RouteModel, prefer: np.ndarray | None) -> np.ndarray:
    """[H, L, E] replicas of `view` spread over each node's hosts by the work they will serve (stay-home
    when `table` is None). Along routes a node computes the calls of every home that executes there,
    not only its own requests', and a layer waits for the slowest of the node's GPUs: so each layer is
    balanced on its own (heaviest expert first to the host with the least work in that layer over its
    speed; ties to the least loaded host overall, then the lower index), within each host's room
    (`_per_layer`), and replicas that no home's calls reach last, where room is left; a replica
    `prefer` already places stays."""
    cluster = model.cluster
    if table is None:
        table = stay_home(*view.shape[:2])
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
    """[h, L, E] one node's replicas held [L, E] over its h hosts, each layer balanced (see `_hosts`).
    A host whose room cannot take its speed's share of the busy replicas takes its share of each layer
    (rounding carried from layer to layer): filled as it comes, it ran out of room halfway and the
    node's other GPU computed every layer after that alone."""
    out = np.zeros((room.size, *held.shape), dtype=bool)
    room = room.astype(np.int64).copy()
    if prefer is not None:
        stay = prefer & held[None] & (np.cumsum(prefer & held[None], axis=0) == 1)  # one host keeps each
        for k in range(room.size):
            keep = np.argwhere(stay[k])[: room[k]]
            out[k, keep[:, 0], keep[:, 1]] = True
            room[k] -= keep.shape[0]
    busy = held & (load > 0.0) & ~out.any(axis=0)  # [L, E] replicas calls reach, still to place
    n_busy = int(busy.sum())
    share = _water_fill(n_busy, room.astype(np.float64), speed) / max(n_busy, 1)  # of each layer, per host
    capped = share * n_busy >= room - 1e-9  # hosts whose room binds
    carry = np.zeros(room.size)
    total = np.zeros(room.size)
    for lay in range(held.shape[0]):
        acc = (out[:, lay] * load[lay]).sum(axis=1)
        left = np.flatnonzero(busy[lay])
        due = left.size * share + carry
        cap = np.where(capped, np.floor(due + 1e-9), np.inf)
        taken = np.zeros(room.size)
        for e in left[np.lexsort((left, -load[lay, left]))].tolist():
            key = np.lexsort((np.arange(room.size), total / speed, (acc + load[lay, e]) / speed))
            k = next((int(i) for i in key if room[i] > 0 and taken[i] < cap[i]), int(np.argmax(room)))
            out[k, lay, e] = True
            acc[k] += load[lay, e]
            total[k] += load[lay, e]
            taken[k] += 1
            room[k] -= 1
        carry = np.where(capped, due - taken, 0.0)
    for lay, e in np.argwhere(held & ~out.any(axis=0)).tolist():  # spares no call reaches: where room is left
        k = int(np.argmax(room))
        out[k, lay, e] = True
        room[k] -= 1
    return out


def _water_fill(amount: float, cap: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """[h] `amount` shared in proportion to `weight`, no host above its `cap` (what a capped host cannot
    take goes to the others in the same proportion); Σ cap >= amount. `_common.apportion` is its
    integer form; the exact shares tell which hosts the room binds (a share rounded up to the room
    is not bound by it)."""
    out = np.zeros(cap.size)
    free = np.ones(cap.size, dtype=bool)
    left = float(amount)
    while left > 1e-9 and free.any():
        level = left / weight[free].sum()
        full = free & (cap <= level * weight)
        if not full.any():
            out[free] = level * weight[free]
            break
        out[full] = cap[full]
        left -= float(cap[full].sum())
        free &= ~full
    return out


def _choose(scored: list[tuple[float, Placement]], pipe: Placement, model: RouteModel,
            current: Placement | None, min_gain: float) -> Placement:
    """The candidate of `scored` (migration cost, placement) to serve with (module docstring): a routed
    layout other than the pipeline split must beat the pipeline by ROUTED_MIN_GAIN on the load view; of
    the rest, those within ROW_MARGIN of the lowest row view compete on the load view plus migration,
    the first of equal costs. `current` stays unless the choice `replaces` it."""
    pipe_views = model.view_costs(pipe)  # (the model remembers each layout's views: candidates repeat)
    # the pipeline is a candidate, so the lowest row view is at most its own: a candidate this far above
    # it is out whatever the others, and is not rehearsed
    out_above = min(((model.row_cost(p) + m) * (1.0 + ROW_MARGIN) for m, p in scored if p is pipe), default=np.inf)
    kept = []
    for migration, placement in scored:
        if model.row_cost(placement) + migration > out_above:
            continue
        views = model.view_costs(placement)
        routed = placement is not pipe and placement.routes is not None
        if routed and views.load > pipe_views.load * (1.0 - ROUTED_MIN_GAIN):
            continue
        kept.append((views.plus(migration), placement))
    floor = min((views.row for views, _ in kept), default=pipe_views.row)
    views, best = min(((v, p) for v, p in kept if v.row <= floor * (1.0 + ROW_MARGIN)),
                      key=lambda vp: vp[0].load, default=(pipe_views, pipe))
    if current is not None and not replaces(views, model.view_costs(current), min_gain):
        return current
    return best


def route(
    freq: np.ndarray,
    cluster: Cluster,
    *,
    coact: CoActivation | None = None,
    current: Placement | None = None,
    workload: Workload | None = None,
) -> Placement:
    """The (placement, routes) with the lowest expected decode-step time; see the module docstring.
    freq [N, L, E]."""
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
    cands, pipe = _candidates(f, cluster, model, coact, current)
    if model.rehearsal is not None and cluster.num_nodes <= SPLIT_MAX_NODES:
        moved = _moved_split(pipe, f, model, prefer)
        if moved is not None:
            cands.append((moved.node_view(cluster), moved.routes, moved))
    for view, table, made in cands:
        if table is not None and not _fits(view, table, slots, wl.kv_slots_per_layer):
            continue  # (stay-home candidates always fit: valid stay-home placements)
        placement = made if made is not None else Placement(_hosts(view, table, model, prefer),
                                                             routes=table)
        migration = (float(wl.node_migration_cost_s @ (view & ~cur_view).sum(axis=(1, 2)))  # replicas each node loads
                     if cur_view is not None else 0.0)
        scored.append((migration, placement))
    return _choose(scored, pipe, model, current, wl.min_gain)
