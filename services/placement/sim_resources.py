"""Resources of the simulator: busy timelines of hosts and links, and who serves a requester's calls.

Shape legend: N nodes, H hosts, L MoE layers, E experts. Pure numpy; nothing here imports nats.
"""

from __future__ import annotations

import numpy as np

from services.placement.types import Cluster, Placement


class Timeline:
    """Busy intervals of one resource (a host or a directed link), sorted and disjoint."""

    __slots__ = ("busy",)

    def __init__(self) -> None:
        self.busy: list[tuple[float, float]] = []

    def earliest(self, ready: float, duration: float, now: float) -> float:
        """Where `book` would start `duration` seconds asked for at `ready` (nothing is booked)."""
        self._forget(now)
        return self._gap(ready, duration)[0]

    def _forget(self, now: float) -> None:
        b = self.busy
        while b and b[0][1] <= now:
            del b[0]

    def _gap(self, ready: float, duration: float) -> tuple[float, int]:
        """(start, index of the interval it goes before) of the earliest gap of `duration` at or after `ready`."""
        start = ready
        for k, (s, e) in enumerate(self.busy):
            if start + duration <= s:
                return start, k
            start = max(start, e)
        return start, len(self.busy)

    def book(self, ready: float, duration: float, now: float) -> float:
        """Book `duration` seconds at the earliest gap starting at or after `ready`; return the end.
        Intervals that ended before `now` are dropped: no later booking can start before `now`."""
        b = self.busy
        if b and b[0][1] <= now:
            self._forget(now)
        if not b or ready >= b[-1][1]:                       # the common case: after everything booked
            end = ready + duration
            if b and b[-1][1] == ready:
                b[-1] = (b[-1][0], end)
            else:
                b.append((ready, end))
            return end
        start, pos = self._gap(ready, duration)
        end = start + duration
        # merge with touching neighbours, so a saturated resource stays one interval, not thousands
        end_merged = end
        if pos < len(b) and b[pos][0] == end:
            end_merged = b[pos][1]
            del b[pos]
        if pos > 0 and b[pos - 1][1] == start:
            b[pos - 1] = (b[pos - 1][0], end_merged)
        else:
            b.insert(pos, (start, end_merged))
        return end


def book_on_a_core(line: Timeline, cores: list[Timeline], ready: float, duration: float, now: float) -> float:
    """Book `duration` on `line` (a host) and, at the same time, on one of `cores` (the machine the hosts
    share); return the end. Without cores, `line` alone."""
    if not cores:
        return line.book(ready, duration, now)
    start = ready
    while True:  # the start only moves later, and every timeline is free after its last interval
        start = line.earliest(start, duration, now)
        first, core = min((c.earliest(start, duration, now), i) for i, c in enumerate(cores))
        if first == start:
            cores[core].book(start, duration, now)
            return line.book(start, duration, now)
        start = first


def serving_nodes(view: np.ndarray, cluster: Cluster) -> np.ndarray:
    """[N, L, E] int: the node that serves requester n's calls to (l, e): n itself if it holds a
    replica, else the nearest holder (lowest rtt, highest bandwidth, next index after n cyclically)."""
    N = cluster.num_nodes
    out = np.empty(view.shape, dtype=np.int64)
    for n in range(N):
        others = [m for m in range(N) if m != n]
        ranked = sorted(others, key=lambda m: (cluster.rtt_s[n, m], -cluster.bandwidth_Bps[n, m], (m - n) % N))
        order = np.array([n, *ranked])
        first = np.argmax(view[order], axis=0)             # [L, E] index into `order` of the first holder
        out[n] = order[first]
    return out


def serving_hosts(placement: Placement, cluster: Cluster) -> np.ndarray:
    """[N, L, E] int: the host that computes requester n's calls to (l, e), on the serving node. When
    several hosts of that node hold a replica, requesters are spread over them by (n + e) (a queue
    group spreads requests too; a fixed rule keeps runs deterministic)."""
    hosts = placement.hosts
    serve = serving_nodes(placement.node_view(cluster), cluster)        # [N, L, E]
    N, _, E = serve.shape
    out = np.empty_like(serve)
    e_idx = np.arange(E)[None, :]
    for m in range(N):
        hs = cluster.hosts_of(m)
        held = hosts[hs]                                                # [h_m, L, E]
        count = held.sum(axis=0)                                        # [L, E]
        rank = np.cumsum(held, axis=0) - 1                              # replica rank on each host
        for n in range(N):
            want = (n + e_idx) % np.maximum(count, 1)                   # [L, E]
            pick = np.argmax(held & (rank == want[None]), axis=0)       # [L, E] index into hs
            mask = serve[n] == m
            out[n][mask] = hs[pick][mask]
    return out
