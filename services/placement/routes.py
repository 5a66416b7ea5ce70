"""Routes: which node executes each MoE layer for the requests of each home node.

A *route* of home node h is a list of L node indices, route[l] = the node that executes layer l for
h's requests (holds their KV cache for that layer and calls that layer's experts from where it
stands). Stay-home is [h] * L, what every request did before routes. The hidden states of a step hop
one way from one executing node to the next and back home after the last layer, where the head runs.
A *route table* is [N, L] int, one route per home; `None` in a Placement means stay-home everywhere.

A route cut into maximal runs of one node gives its *segments* (start, end, node) with `end`
exclusive, the shape in which exo and llama.cpp describe a layer split.

Shape legend: N nodes, L MoE layers. Pure numpy; nothing here imports nats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from services.placement.errors import InvalidInputError


class Segment(NamedTuple):
    """Layers [start, end) of a route executed by `node`."""

    start: int
    end: int
    node: int


def check_route(route: Sequence[int] | np.ndarray, num_nodes: int, num_layers: int) -> np.ndarray:
    """One route as an [L] int64 array; InvalidInputError unless it has `num_layers` integer entries
    in 0..num_nodes-1."""
    r = np.asarray(route)
    if r.shape != (num_layers,):
        raise InvalidInputError(f"a route needs one node per layer ({num_layers}), got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.number) or not np.all(np.isfinite(r)) or np.any(r != np.round(r)):
        raise InvalidInputError(f"route entries must be integer node indices, got {r.tolist()}")
    if r.size and (r.min() < 0 or r.max() >= num_nodes):
        raise InvalidInputError(f"route entries must be node indices 0..{num_nodes - 1}, got {r.tolist()}")
    return r.astype(np.int64)


def check_routes(table: np.ndarray, num_nodes: int, num_layers: int) -> np.ndarray:
    """A route table [N, L] (row h: home h's route) checked by `check_route`, as int64."""
    t = np.asarray(table)
    if t.ndim != 2 or t.shape[0] != num_nodes:
        raise InvalidInputError(f"routes must be [{num_nodes} homes, {num_layers} layers], got shape {t.shape}")
    return np.stack([check_route(row, num_nodes, num_layers) for row in t]) if num_nodes else t.astype(np.int64)


def stay_home(num_nodes: int, num_layers: int) -> np.ndarray:
    """[N, L] int: every home executes every layer itself."""
    return np.repeat(np.arange(num_nodes, dtype=np.int64)[:, None], num_layers, axis=1)


def is_stay_home(table: np.ndarray) -> bool:
    """Whether every row of the route table [N, L] is its own home."""
    t = np.asarray(table)
    return bool(np.all(t == np.arange(t.shape[0])[:, None]))


def segments(route: Sequence[int] | np.ndarray) -> list[Segment]:
    """Maximal runs of one node: [3, 3, 0, 0, 0, 3] → (0, 2, 3), (2, 5, 0), (5, 6, 3)."""
    r = np.asarray(route, dtype=np.int64)
    if r.size == 0:
        return []
    cuts = np.flatnonzero(r[1:] != r[:-1]) + 1
    starts = np.r_[0, cuts]
    ends = np.r_[cuts, r.size]
    return [Segment(int(s), int(e), int(r[s])) for s, e in zip(starts, ends, strict=True)]


def hops(route: Sequence[int] | np.ndarray, home: int) -> int:
    """One-way hops of a step along the route: into the first segment if it is not home, between
    segments, and back home after the last."""
    r = np.asarray(route, dtype=np.int64)
    path = np.r_[home, r, home]
    return int(np.sum(path[1:] != path[:-1]))


def foreign_layers(table: np.ndarray) -> np.ndarray:
    """[N] int: layers each node executes for other homes (it holds their KV for those layers)."""
    t = np.asarray(table, dtype=np.int64)
    n = t.shape[0]
    foreign = t != np.arange(n)[:, None]
    return np.bincount(t[foreign], minlength=n).astype(np.int64)


def kv_slots(table: np.ndarray | None, num_nodes: int, slots_per_layer: float) -> np.ndarray:
    """[N] int: expert slots each node gives up for foreign KV, ceil(foreign layers × slots_per_layer)."""
    if table is None or slots_per_layer <= 0:
        return np.zeros(num_nodes, dtype=np.int64)
    return np.ceil(foreign_layers(table) * slots_per_layer - 1e-9).astype(np.int64)
