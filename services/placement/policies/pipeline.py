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
Where the slots cannot hold those layers' experts and the KV as well, the layers left over run at
every home (no foreign KV: each home calls their experts where they are, as a stay-home policy does);
and where the whole layers' KV leaves too little room even for that, one whole layer fewer is split
(at none, every layer runs at home). So the plan always fits the slots with its foreign KV.

Worked example: slots 64, 64, 128 and 4 layers × 16 experts (no KV) → ranges of 1, 1, 2 layers:
node 0 layer 0, node 1 layer 1, node 2 layers 2-3; every home's route is [0, 1, 2, 2].
"""

from __future__ import annotations

import numpy as np

from services.placement.errors import InfeasibleError
from services.placement.policies._common import apportion, assign_to_hosts, expert_major_blocks
from services.placement.types import Cluster, CoActivation, Placement, Workload, check_inputs


def layer_capacity(node_slots: np.ndarray, num_experts: int, kv_slots_per_layer: float) -> np.ndarray:
    """[N] int: whole layers each node can run for every home (experts + the others' KV)."""
    n = node_slots.size
    per_layer = num_experts + max(n - 1, 0) * kv_slots_per_layer
    return np.floor(node_slots / per_layer + 1e-9).astype(np.int64)


def pipeline_split(node_slots: np.ndarray, num_layers: int, num_experts: int,
                   kv_slots_per_layer: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(view [N, L, E] bool, owner [L] int, -1 for a layer every home runs itself): contiguous ranges
    ∝ slots, degraded as the module says."""
    slots = np.asarray(node_slots, dtype=np.int64)
    cap = np.minimum(layer_capacity(slots, num_experts, kv_slots_per_layer), num_layers)
    for whole in range(min(num_layers, int(cap.sum())), -1, -1):
        counts = apportion(whole, slots, cap)
        split = _split(slots, counts, num_layers, num_experts, kv_slots_per_layer)
        if split is not None:
            return split
    raise InfeasibleError(f"{num_layers} layers × {num_experts} experts do not fit {int(slots.sum())} slots")


def _split(slots: np.ndarray, counts: np.ndarray, num_layers: int, num_experts: int, kv: float
           ) -> tuple[np.ndarray, np.ndarray] | None:
    """Whole ranges of counts [N] layers, the rest degraded: run by the node with the most room, else at
    every home; None if even that does not fit beside the whole ranges' KV."""
    n_nodes, whole = slots.size, int(counts.sum())
    owner = np.full(num_layers, -1, dtype=np.int64)
    owner[:whole] = np.repeat(np.arange(n_nodes), counts)
    view = np.zeros((n_nodes, num_layers, num_experts), dtype=bool)
    view[owner[:whole], np.arange(whole)] = True
    left = num_layers - whole
    if left == 0:
        return view, owner

    def room_beside(layers_run: np.ndarray) -> np.ndarray:  # slots left with the KV of the layers each runs
        kv_room = np.ceil((n_nodes - 1) * kv * layers_run - 1e-9).astype(np.int64)
        return np.asarray(slots - counts * num_experts - kv_room)

    room = room_beside(counts)
    runs = _runners(room, left, n_nodes, kv)
    with_kv = room_beside(counts + np.bincount(runs, minlength=n_nodes))
    if np.all(with_kv >= 0) and with_kv.sum() >= left * num_experts:
        owner[whole:] = runs
        room = with_kv
    elif np.all(room >= 0) and room.sum() >= left * num_experts:
        pass  # no room for their KV: every home runs them itself
    else:
        return None
    share = apportion(left * num_experts, room, room)
    view[:, whole:] = expert_major_blocks(share, left, num_experts)
    return view, owner


def _runners(room: np.ndarray, left: int, n_nodes: int, kv: float) -> np.ndarray:
    """[left] the node that runs each left-over layer: the one with the most room then (ties: lower index),
    which reserves the other homes' KV for it."""
    room = room.astype(np.float64).copy()
    out = np.zeros(left, dtype=np.int64)
    for i in range(left):
        out[i] = int(np.argmax(room))
        room[out[i]] -= (n_nodes - 1) * kv
    return out


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
    homes = np.arange(n_nodes)[:, None]
    routes = np.where(owner[None, :] >= 0, owner[None, :], homes)  # -1: every home runs the layer itself
    return Placement(assign_to_hosts(view, cluster, f), routes=routes)
