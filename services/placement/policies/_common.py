"""Helpers shared by the policies: apportionment, per-layer slot budgets, node → host assignment.

Shape legend: N nodes, H hosts, L layers, E experts per layer.
"""

from __future__ import annotations

import numpy as np

from services.placement.types import Cluster


def apportion(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Split the integer `total` ∝ weights [M] (largest remainder), never above caps [M] int.

    Ties go to the lower index. Needs total <= caps.sum(); returns [M] int summing to total.
    Zero weights everywhere means an even split.
    """
    w = np.asarray(weights, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.int64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    out = np.zeros(w.shape, dtype=np.int64)
    left, active = int(total), caps > 0
    # Water-filling: entries whose share exceeds their cap are pinned at the cap, the rest re-split.
    while left > 0 and active.any():
        share = np.where(active, w, 0.0)
        if share.sum() <= 0:
            share = active.astype(np.float64)
        ideal = left * share / share.sum()
        room = caps - out
        capped = active & (ideal >= room)
        if capped.any():
            left -= int(room[capped].sum())
            out[capped] = caps[capped]
            active &= ~capped
            continue
        base = np.floor(ideal).astype(np.int64)
        rem = left - int(base.sum())
        order = np.lexsort((np.arange(w.size), -(ideal - base)))  # largest remainder, then lower index
        base[order[:rem]] += 1
        out += base
        left = 0
    return out


def layer_slots(host_slots: np.ndarray, num_layers: int) -> np.ndarray:
    """[H, L] int: each host's slots spread evenly over layers; column sums differ by at most one.

    Host h gets floor(slots_h / L) per layer; its remaining slots_h mod L go round-robin to layers,
    continuing where the previous host stopped, so every layer gets floor(Σ slots / L) or one more.
    """
    slots = np.asarray(host_slots, dtype=np.int64)
    out = np.repeat((slots // num_layers)[:, None], num_layers, axis=1)
    start = 0
    for h, r in enumerate(slots % num_layers):
        out[h, (start + np.arange(r)) % num_layers] += 1
        start += int(r)
    return out


def expert_major_blocks(counts: np.ndarray, num_layers: int, num_experts: int) -> np.ndarray:
    """[H, L, E] bool: logical experts in expert-major order (e, l) cut into contiguous blocks of counts [H].

    With equal counts this is vLLM's linear layout: host r holds experts [r·E/H, (r+1)·E/H) of every layer.
    Needs counts.sum() == L·E.
    """
    owner = np.repeat(np.arange(counts.size), counts)  # [L·E] host of each position
    hosts = np.zeros((counts.size, num_layers, num_experts), dtype=bool)
    pos = np.arange(num_layers * num_experts)
    hosts[owner, pos % num_layers, pos // num_layers] = True
    return hosts


def assign_to_hosts(
    node_sets: np.ndarray, cluster: Cluster, load: np.ndarray, prefer: np.ndarray | None = None
) -> np.ndarray:
    """Spread each node's replicas over its hosts: node_sets [N, L, E] bool → hosts [H, L, E] bool.

    load [N, L, E] float is the work a replica brings (e.g. calls it serves). Per node, a replica that
    a host already holds in `prefer` [H, L, E] stays there (bias to stay: nothing to load); the rest go
    heaviest first to the host with the least load / speed that still has a slot (LPT greedy, ties to
    the lower host index), so fast hosts take more work. Needs node_sets[n].sum() <= node_slots[n].
    """
    n_nodes, n_layers, n_experts = node_sets.shape
    hosts = np.zeros((cluster.num_hosts, n_layers, n_experts), dtype=bool)
    for n in range(n_nodes):
        members = cluster.hosts_of(n)
        if members.size == 1:
            hosts[members[0]] = node_sets[n]
            continue
        items = np.argwhere(node_sets[n])
        w = load[n][node_sets[n]]
        room = cluster.host_slots[members].astype(np.int64).copy()
        speed = cluster.host_speed[members]
        acc = np.zeros(members.size)
        placed = np.zeros(w.size, dtype=bool)
        if prefer is not None:
            for k, h in enumerate(members):
                keep = np.flatnonzero(prefer[h][node_sets[n]] & ~placed)[: room[k]]
                hosts[h, items[keep, 0], items[keep, 1]] = True
                placed[keep], room[k], acc[k] = True, room[k] - keep.size, w[keep].sum()
        for i in np.lexsort((np.arange(w.size), -w)):
            if placed[i]:
                continue
            cost = np.where(room > 0, (acc + w[i]) / speed, np.inf)
            k = int(np.argmin(cost))
            room[k] -= 1
            acc[k] += w[i]
            hosts[members[k], items[i, 0], items[i, 1]] = True
    return hosts


def ranks(freq: np.ndarray) -> np.ndarray:
    """[..., E] int: position of each expert when sorted by descending freq (ties: lower index first)."""
    order = np.argsort(-freq, axis=-1, kind="stable")
    out = np.empty_like(order)
    np.put_along_axis(out, order, np.broadcast_to(np.arange(freq.shape[-1]), order.shape), axis=-1)
    return out


def fill_top(freq: np.ndarray, counts: np.ndarray, rank: np.ndarray | None = None) -> np.ndarray:
    """[N, L, E] bool: node n holds its counts[n, l] most used experts of layer l (ties: lower index).

    rank: `ranks(freq)` if the caller already has it."""
    return (ranks(freq) if rank is None else rank) < np.asarray(counts)[..., None]


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest finite entries of a 1-D array, by descending value then lower index.

    O(n) selection plus a sort of the k winners (a full argsort of L·E entries per node is the
    bottleneck of several policies at 64 × 58 × 256). Counts are often mostly zero; selecting among
    the positive entries first keeps the selection away from long runs of equal values.
    """
    finite = np.flatnonzero(np.isfinite(values))
    k = min(k, finite.size)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    pos = finite[values[finite] > 0]
    if pos.size <= k:
        rest = finite[values[finite] <= 0]
        rest = rest[np.lexsort((rest, -values[rest]))][: k - pos.size]
        return np.concatenate([pos[np.lexsort((pos, -values[pos]))], rest])
    vals = values[pos]
    kth = np.partition(vals, vals.size - k)[vals.size - k]  # the k-th largest value
    above = pos[vals > kth]
    ties = pos[vals == kth][: k - above.size]  # lower indices win ties at the threshold
    pick = np.concatenate([above, ties])
    return pick[np.lexsort((pick, -values[pick]))]


def fill_spare(view: np.ndarray, freq: np.ndarray, node_slots: np.ndarray) -> np.ndarray:
    """Fill each node's unused slots with its most used experts it lacks (any layer); returns a copy.

    view [N, L, E] bool, freq [N, L, E], node_slots [N]. Ties go to the lower flat (layer, expert) index.
    """
    out = view.copy()
    for n in range(view.shape[0]):
        spare = int(node_slots[n]) - int(out[n].sum())
        if spare > 0:
            take = top_indices(np.where(out[n].ravel(), -np.inf, freq[n].ravel()), spare)
            out[n].reshape(-1)[take] = True
    return out


def repair_coverage(view: np.ndarray, freq: np.ndarray, node_slots: np.ndarray) -> np.ndarray:
    """Give every uncovered logical expert a replica by evicting low-use duplicates; returns a copy.

    view [N, L, E] bool (each node within its slots), freq [N, L, E], node_slots [N] int.
    Uncovered experts are handled in descending total frequency (ties: lower flat index). Each goes
    to the node where it costs least on the proxy: a free slot costs -f[n, u]; otherwise evicting the
    node's least used duplicate v (a replica whose expert is held by >= 2 nodes) costs
    f[n, v] - f[n, u]; ties go to the lower node index. Needs Σ node_slots >= L·E.
    """
    v = view.copy()
    n_nodes = v.shape[0]
    flat = v.reshape(n_nodes, -1)
    ff = freq.reshape(n_nodes, -1)
    uncovered = np.flatnonzero(~flat.any(axis=0))
    if uncovered.size:
        _Repair(flat, ff, np.asarray(node_slots)).run(uncovered)
    return v


class _Repair:
    """State of `repair_coverage`; works in place on flat [N, L·E] bool. Scalar work in Python lists,
    where numpy's per-element indexing would dominate (10^4 uncovered experts at 64 × 58 × 256)."""

    def __init__(self, flat: np.ndarray, ff: np.ndarray, node_slots: np.ndarray) -> None:
        self.flat, self.ff = flat, ff
        n_nodes = flat.shape[0]
        self.cnt: list[int] = flat.sum(axis=0).tolist()
        self.free: list[int] = (node_slots.astype(np.int64) - flat.sum(axis=1)).tolist()
        # Per node: its replicas in ascending use; ptr walks past entries that stopped being
        # duplicates (counts only fall, so an entry skipped once never becomes a victim again).
        self.victims: list[list[int]] = []
        self.vcost: list[list[float]] = []
        for n in range(n_nodes):
            held = np.flatnonzero(flat[n])
            held = held[np.argsort(ff[n, held], kind="stable")]
            self.victims.append(held.tolist())
            self.vcost.append(ff[n, held].tolist())
        self.ptr = [0] * n_nodes
        self.cur = [-1] * n_nodes
        self.cost = np.zeros(n_nodes)  # taking node n's next slot: 0 if free, else its victim's use
        for n in range(n_nodes):
            self.advance(n)

    def advance(self, n: int) -> None:
        vs, p = self.victims[n], self.ptr[n]
        while p < len(vs) and self.cnt[vs[p]] < 2:
            p += 1
        self.ptr[n] = p
        self.cur[n] = vs[p] if p < len(vs) else -1
        self.cost[n] = 0.0 if self.free[n] > 0 else (self.vcost[n][p] if p < len(vs) else np.inf)

    def evict(self, n: int) -> None:
        w = self.cur[n]
        if w < 0:
            raise RuntimeError("coverage repair found no slot: total slots below the number of experts")
        self.flat[n, w] = False
        self.cnt[w] -= 1
        self.ptr[n] += 1
        if self.cnt[w] == 1:  # the last holder of w can no longer give it up
            m = int(np.argmax(self.flat[:, w]))
            if self.cur[m] == w:
                self.advance(m)

    def run(self, uncovered: np.ndarray) -> None:
        uncovered = uncovered[np.argsort(-self.ff[:, uncovered].sum(axis=0), kind="stable")]
        ff_t = np.ascontiguousarray(self.ff[:, uncovered].T)  # [U, N]
        buf = np.empty_like(self.cost)
        for i, u in enumerate(uncovered.tolist()):
            n = int(np.subtract(self.cost, ff_t[i], out=buf).argmin())
            if self.free[n] > 0:
                self.free[n] -= 1
            else:
                self.evict(n)
            self.flat[n, u] = True
            self.cnt[u] += 1
            self.advance(n)
