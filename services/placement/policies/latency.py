"""`latency` (ours): minimise the expected decode latency of `latency_model`, not the remote-call proxy.

Why: a token's top-k experts are fetched in parallel, so a (token, layer) pays one round trip if ANY
of its experts is remote, and the traffic to each distinct remote node is one group on its link (the
bytes count per remote expert, or per node; see `latency_model`). When round trips dominate,
giving a node whole layers beats the proxy optimum; when bytes or queueing dominate, the proxy
optimum wins (see ARCHITECTURE.md, Placement). No single construction is best in every regime, so:

1. Candidates (node-level views, every expert covered, each node within its slots):
   - `proxy`: the proxy optimum (exact LP when N·L·E <= EXACT_LIMIT, else each node's top
     experts plus the coverage repair);
   - `whole_layers`: layer-major contiguous blocks ∝ node slots (whole layers per node), spare slots
     filled with the node's most used experts;
   - `most_whole_layers`: every node holds as many whole layers as fit (each layer at least once,
     then the layers that save the node most), leftover slots by frequency;
   - `slot_split`: per node, slot counts per layer chosen on the latency model itself — a Lagrangian
     split of the node's slots over layers minimising the round trips plus bytes of its own tokens
     given its top-s experts per layer (so a layer can get all E slots when that saves the round
     trip), then the coverage repair;
   - every other registered policy (uniform, redundance, eplb, prism), and `current` if given.
2. Each is scored by `LatencyModel` (+ migration cost against `current`); the best is improved by
   local search (slot trades between layers, `_local_search`) for as many moves as fit a work budget
   (SEARCH_BUDGET, counted in model work rather than seconds, so the result is deterministic; big
   clusters skip the search).
3. Hysteresis against `current`: the new plan replaces it only if latency + Σ per node of its
   migration_cost_s × its new replicas < latency(current) × (1 - min_gain); otherwise `current` is returned unchanged.

Because the other policies are candidates (`optimal` as the exact proxy candidate, up to EXACT_LIMIT;
above it the LP takes seconds and the greedy proxy candidate stands in) and every later step only
accepts improvements, the result is never worse than the best of them on this model. Ties go to the
earlier candidate in the order above. Deterministic: no clocks, no unseeded randomness.
"""

from __future__ import annotations

import numpy as np

from services.placement.latency_model import LatencyModel
from services.placement.policies._common import (
    apportion,
    assign_to_hosts,
    expert_major_blocks,
    fill_spare,
    fill_top,
    ranks,
    repair_coverage,
    top_indices,
)
from services.placement.policies._local_search import LocalSearch
from services.placement.policies.eplb import eplb
from services.placement.policies.optimal import solve_node_sets
from services.placement.policies.prism import prism_view
from services.placement.policies.redundance import redundance
from services.placement.policies.uniform import uniform
from services.placement.types import Cluster, CoActivation, Placement, Workload, check_inputs

EXACT_LIMIT = 60_000  # N·L·E up to which the proxy candidate is the exact LP optimum
SEARCH_BUDGET = 1e7  # local-search work, in (sampled token, expert, pseudo-layer) visits (~0.5 s)
MAX_MOVES = 400


def search_moves(model: LatencyModel, num_layers: int, num_experts: int) -> int:
    """How many local-search moves fit SEARCH_BUDGET (0: skip the search).

    One pseudo-layer evaluation visits U = Σ_n sampled tokens × K token-experts plus ~4·N·E cells of
    the serving and work maps. The first pass evaluates 2·N·L pseudo-layers, a move 4·N.
    """
    n_nodes = model.cluster.num_nodes
    per_layer = sum(b.size for b in model.batches) * model.coact.top_k + 4 * n_nodes * num_experts
    first, per_move = 2 * n_nodes * num_layers * per_layer, 4 * n_nodes * per_layer
    if first >= SEARCH_BUDGET:
        return 0
    return int(min(MAX_MOVES, (SEARCH_BUDGET - first) // per_move))


def proxy_view(f: np.ndarray, node_slots: np.ndarray) -> np.ndarray:
    """The proxy optimum (exact when small), else each node's top experts overall plus repair."""
    if f.size <= EXACT_LIMIT:
        return solve_node_sets(f, node_slots)
    view = fill_spare(np.zeros(f.shape, dtype=bool), f, np.minimum(node_slots, f.shape[1] * f.shape[2]))
    return repair_coverage(view, f, node_slots)


def whole_layers_view(f: np.ndarray, node_slots: np.ndarray) -> np.ndarray:
    """Layer-major blocks ∝ node slots (node n holds whole layers), spare slots by frequency."""
    _, n_layers, n_experts = f.shape
    counts = apportion(n_layers * n_experts, node_slots, node_slots)
    # expert_major_blocks on the transposed shape gives layer-major order.
    view = expert_major_blocks(counts, n_experts, n_layers).transpose(0, 2, 1)
    return fill_spare(view, f, node_slots)


def most_whole_layers_view(f: np.ndarray, node_slots: np.ndarray, saving: np.ndarray) -> np.ndarray | None:
    """Each node holds as many whole layers as its slots allow: first every layer once (blocks ∝
    whole-layer capacity), then each node adds the layers that save it most (saving [N, L]; ties:
    lower layer); leftover slots by frequency. None if whole layers cannot cover every layer."""
    n_nodes, n_layers, n_experts = f.shape
    whole = np.minimum(np.asarray(node_slots) // n_experts, n_layers)
    if whole.sum() < n_layers:
        return None
    first = apportion(n_layers, whole, whole)
    owner = np.repeat(np.arange(n_nodes), first)  # layer-major blocks: layer l's first holder
    layers = np.zeros((n_nodes, n_layers), dtype=bool)
    layers[owner, np.arange(n_layers)] = True
    for n in range(n_nodes):
        extra = int(whole[n] - first[n])
        if extra > 0:
            gain = np.where(layers[n], -np.inf, saving[n])
            layers[n, top_indices(gain, extra)] = True
    view = np.repeat(layers[:, :, None], n_experts, axis=2)
    return fill_spare(view, f, node_slots)


def _layer_costs(model: LatencyModel, f: np.ndarray, rk: np.ndarray) -> np.ndarray:
    """c [N, L, E + 1]: mean per-step network time of node n's tokens in layer l if it holds its
    top-s experts there (s = 0..E) and everything else is one average link away."""
    n_nodes, n_layers, n_experts = f.shape
    out = np.zeros((n_nodes, n_layers, n_experts + 1))
    off = ~np.eye(n_nodes, dtype=bool)
    for n in range(n_nodes):
        batches = model.batches[n]
        if batches.size == 0 or n_nodes == 1:
            continue
        nb = batches.shape[0]
        sets = model.coact.sets[n][model.samples[n][batches.ravel()]]  # [nb·B, L, K]
        top = rk[n][np.arange(n_layers)[None, :, None], sets].max(axis=2)  # [nb·B, L] worst rank
        worst_b = top.reshape(nb, -1, n_layers).max(axis=1)  # [nb, L]
        rtt, bt = model.rtt[n][off[n]].mean(), model.byte_time[n][off[n]].mean()
        for hist_src, scale in ((top, bt), (worst_b, rtt)):
            hist = np.zeros((n_layers, n_experts + 1))
            np.add.at(hist, (np.broadcast_to(np.arange(n_layers), hist_src.shape), hist_src + 1), 1.0)
            # tokens (or batches) whose worst rank >= s pay: count of values > s - 1
            out[n] += scale * (hist_src.shape[0] - np.cumsum(hist, axis=1)) / nb
    return out


def slot_split_view(f: np.ndarray, node_slots: np.ndarray, rk: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Per node, split slots over layers by a Lagrangian on c = `_layer_costs`, fill top-s, repair."""
    n_nodes, n_layers, n_experts = f.shape
    s = np.arange(n_experts + 1)
    budget = np.minimum(node_slots, n_layers * n_experts)
    lo, hi = np.zeros(n_nodes), np.full(n_nodes, c.max() + 1.0)
    for _ in range(24):  # smallest price per slot whose unconstrained choice fits the budget
        mid = (lo + hi) / 2
        fits = np.argmin(c + mid[:, None, None] * s, axis=2).sum(axis=1) <= budget
        hi, lo = np.where(fits, mid, hi), np.where(fits, lo, mid)
    counts = np.argmin(c + hi[:, None, None] * s, axis=2)
    view = fill_spare(fill_top(f, counts, rk), f, budget)
    return repair_coverage(view, f, node_slots)


def _candidates(
    f: np.ndarray, cluster: Cluster, model: LatencyModel, current: Placement | None
) -> list[np.ndarray]:
    slots = cluster.node_slots()
    rk = ranks(f)
    c = _layer_costs(model, f, rk)
    views = [proxy_view(f, slots), whole_layers_view(f, slots), slot_split_view(f, slots, rk, c)]
    most = most_whole_layers_view(f, slots, c[:, :, 0] - c[:, :, -1])
    if most is not None:
        views.append(most)
    views += [p(f, cluster).node_view(cluster) for p in (uniform, redundance, eplb)]
    views.append(prism_view(f, slots, rk))
    if current is not None:
        views.append(current.node_view(cluster))
    return views


def _best_candidate(model: LatencyModel, views: list[np.ndarray], mig: np.ndarray) -> tuple[float, np.ndarray]:
    """(cost, view) of the cheapest view on latency + migration; the first of equal costs wins."""
    costs: list[float] = []
    seen: dict[bytes, float] = {}  # identical views (e.g. uniform = redundance without spare) score once
    for v in views:
        key = np.packbits(v).tobytes()
        if key not in seen:
            seen[key] = model.node_view_cost(v) + float(mig[v].sum())
        costs.append(seen[key])
    best = int(np.argmin(costs))
    return costs[best], views[best]


def _usable(current: Placement | None, cluster: Cluster, shape: tuple[int, ...]) -> Placement | None:
    """`current` if it fits this cluster and model shape and is valid, else None (then ignored)."""
    if current is None or current.hosts.shape != (cluster.num_hosts, *shape[1:]):
        return None
    h = current.hosts
    if not h.any(axis=0).all() or np.any(h.sum(axis=(1, 2)) > cluster.host_slots):
        return None
    return current


def latency(
    freq: np.ndarray,
    cluster: Cluster,
    *,
    coact: CoActivation | None = None,
    current: Placement | None = None,
    workload: Workload | None = None,
) -> Placement:
    """Best candidate on the latency model, refined by local search, with hysteresis. freq [N, L, E]."""
    f = check_inputs(freq, cluster)
    model = LatencyModel(cluster, f, coact, workload)
    wl = model.workload
    current = _usable(current, cluster, f.shape)
    cur_view = current.node_view(cluster) if current is not None else np.zeros(f.shape, dtype=bool)
    mig = np.where(cur_view, 0.0, wl.node_migration_cost_s[:, None, None]) if current is not None else np.zeros(f.shape)
    best_cost, best = _best_candidate(model, _candidates(f, cluster, model, current), mig)
    moves = search_moves(model, f.shape[1], f.shape[2])
    if moves > 0:
        search = LocalSearch(model, f, best, cluster.node_slots(), mig)
        view = search.run(moves)
        cost = model.node_view_cost(view) + float(mig[view].sum())
        if cost < best_cost:
            best_cost, best = cost, view
    if current is not None:
        cur_cost = model.node_view_cost(cur_view)
        if not best_cost < cur_cost * (1.0 - wl.min_gain):
            return current
    prefer = current.hosts if current is not None else None
    return Placement(assign_to_hosts(best, cluster, f, prefer=prefer))
