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


def assign_to_hosts(node_sets: np.ndarray, cluster: Cluster, load: np.ndarray) -> np.ndarray:
    """Spread each node's replicas over its hosts: node_sets [N, L, E] bool → hosts [H, L, E] bool.

    load [N, L, E] float is the work a replica brings (e.g. calls it serves). Per node, replicas go
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
        order = np.lexsort((np.arange(w.size), -w))
        room = cluster.host_slots[members].astype(np.int64).copy()
        speed = cluster.host_speed[members]
        acc = np.zeros(members.size)
        for i in order:
            cost = np.where(room > 0, (acc + w[i]) / speed, np.inf)
            k = int(np.argmin(cost))
            room[k] -= 1
            acc[k] += w[i]
            hosts[members[k], items[i, 0], items[i, 1]] = True
    return hosts
