"""`pipeline`: the layer split of exo and llama.cpp RPC, as a baseline for `route`.

Nodes in index order take contiguous layer ranges in proportion to their expert slots; a node holds
every expert of its range (spread over its hosts) and executes those layers for every home: all homes
share one route, route[l] = the owner of layer l. The hidden states hop one way from range to range
and back home for the head. Spare slots stay empty (the split needs nothing else).

Memory: a node that runs a range for the other N - 1 homes also keeps their KV cache for it, so a
layer costs it E + (N - 1) · workload.kv_slots_per_layer slots; its whole-layer capacity is
floor(slots / that). Ranges are ∝ slots, capped by those capacities (largest remainder, water-filling).

Where the nodes cannot hold whole layers for all L layers (Σ capacity < L), it degrades: the layers
that fit are split as above; each layer left over is executed by the node with the most room left
(which keeps the other homes' KV for it), and its experts are spread expert-major over the nodes'
remaining slots (∝ room), so its executing node holds the largest share and calls the rest remotely.

Worked example: slots 64, 64, 128 and 4 layers × 16 experts (no KV) → ranges of 1, 1, 2 layers:
node 0 layer 0, node 1 layer 1, node 2 layers 2-3; every home's route is [0, 1, 2, 2].
"""

from __future__ import annotations

import numpy as np

from services.placement.policies._common import apportion, assign_to_hosts, expert_major_blocks
from services.placement.types import Cluster, CoActivation, Placement, Workload, check_inputs


def layer_capacity(node_slots: np.ndarray, num_experts: int, kv_slots_per_layer: float) -> np.ndarray:
    """[N] int: whole layers each node can run for every home (experts + the others' KV)."""
    n = node_slots.size
    per_layer = num_experts + max(n - 1, 0) * kv_slots_per_layer
    return np.floor(node_slots / per_layer + 1e-9).astype(np.int64)


def pipeline_split(node_slots: np.ndarray, num_layers: int, num_experts: int,
                   kv_slots_per_layer: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(view [N, L, E] bool, owner [L] int): contiguous ranges ∝ slots, degraded as the module says."""
    slots = np.asarray(node_slots, dtype=np.int64)
    n_nodes = slots.size
    cap = np.minimum(layer_capacity(slots, num_experts, kv_slots_per_layer), num_layers)
    whole = min(num_layers, int(cap.sum()))
    counts = apportion(whole, slots, cap)
    owner = np.full(num_layers, -1, dtype=np.int64)
    owner[:whole] = np.repeat(np.arange(n_nodes), counts)
    view = np.zeros((n_nodes, num_layers, num_experts), dtype=bool)
    view[owner[:whole], np.arange(whole)] = True
    if whole < num_layers:
        view[:, whole:], owner[whole:] = _degraded(slots, counts, num_layers - whole, num_experts, kv_slots_per_layer)
    return view, owner


def _degraded(slots: np.ndarray, counts: np.ndarray, left: int, num_experts: int, kv: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """(view [N, left, E], owner [left]) of the layers no node holds whole: each goes to the node with
    the most room left (ties: lower index), which reserves its KV for the other homes; the experts are
    spread expert-major ∝ the room then left, so the owner holds the largest share of its layer."""
    n_nodes = slots.size
    owned = counts.astype(np.float64).copy()
    room = slots - counts * num_experts - (n_nodes - 1) * kv * owned
    owner = np.zeros(left, dtype=np.int64)
    for i in range(left):
        owner[i] = int(np.argmax(room))
        room[owner[i]] -= (n_nodes - 1) * kv
    room = np.floor(np.maximum(room, 0)).astype(np.int64)
    if room.sum() < left * num_experts:  # no room for their KV as well: experts first
        room = slots - counts * num_experts
    share = apportion(left * num_experts, room, room)
    return expert_major_blocks(share, left, num_experts), owner


def pipeline(
    freq: np.ndarray,
    cluster: Cluster,
    *,
    coact: CoActivation | None = None,
    current: Placement | None = None,
    workload: Workload | None = None,
) -> Placement:
    """The pipeline split of f's shape [N, L, E] over the cluster's nodes; every home shares one route."""
    f = check_inputs(freq, cluster)
    n_nodes, n_layers, n_experts = f.shape
    kv = workload.kv_slots_per_layer if workload is not None else 0.0
    view, owner = pipeline_split(cluster.node_slots(), n_layers, n_experts, kv)
    routes = np.repeat(owner[None, :], n_nodes, axis=0)
    return Placement(assign_to_hosts(view, cluster, f), routes=routes)
