"""`eplb`: DeepSeek's expert-parallel load balancer, adapted to hosts of unequal memory and speed.

DeepSeek EPLB, per layer: (1) replicate — each redundant slot goes to the logical expert with the
highest load per replica, w / count; (2) balanced packing — replicas, heaviest per-replica load first,
go to the least loaded GPU that still has a free slot, every GPU holding the same number per layer.
It balances compute and ignores locality: the load is the global count w[l, e] = Σ_n f[n, l, e].

Adaptation (choices ours):
- Slots ∝ memory: host h gets about slots_h / L slots in every layer (`layer_slots`: floor, then the
  remainders round-robin over layers), so a layer has Σ_h s[h, l] >= E physical slots and its
  redundant replicas number Σ_h s[h, l] - E.
- Load ∝ 1 / speed: packing compares (load_h + w) / speed_h, so a twice as fast host takes about twice
  the work.
- A logical expert never gets two replicas on one host: its replica count is capped at the number of
  hosts with slots in that layer, and packing places all replicas of an expert together on distinct
  hosts (the least loaded ones with room). If fewer distinct hosts have room, the extra replicas are
  dropped and their slots stay empty (rare; coverage is kept because room >= remaining experts).
- DeepSeek's hierarchical mode (groups → nodes → GPUs) needs equal nodes; this is its global mode
  (replicate, then pack over all hosts), the mode DeepSeek uses for decoding.

Worked example: 1 layer, 4 experts with loads (8, 4, 2, 2), 2 equal hosts with 3 slots each: 2
redundant slots → expert 0 (8/1 is the highest), then expert 0 is at its cap of 2 hosts, so expert 1
(4/1): counts (2, 2, 1, 1), per-replica loads (4, 2, 2, 2). Packing: expert 0 on hosts 0
and 1 (loads 4, 4); expert 1 on both (6, 6); expert 2 → host 0 (8, 6); expert 3 → host 1 (8, 8).
"""

from __future__ import annotations

import numpy as np

from services.placement.policies._common import layer_slots
from services.placement.types import Cluster, CoActivation, Placement, Workload, check_inputs


def replicate(weight: np.ndarray, phys: np.ndarray, max_count: np.ndarray) -> np.ndarray:
    """Replica counts [L, E] int: each of the phys[l] - E redundant slots of layer l goes to the expert
    with the highest weight / count (ties: lower index), never above max_count[l].

    That greedy takes, per layer, the largest quotients w_e / k (k = 1 .. max_count - 1; taking w_e / k
    gives expert e its (k + 1)-th replica), as in D'Hondt apportionment; ties in the order of the
    greedy (lower expert, then lower k). With many redundant slots it is computed that way, one
    selection per layer; with few, by the greedy itself (vectorised over layers).
    """
    n_layers, n_experts = weight.shape
    count = np.ones((n_layers, n_experts), dtype=np.int64)
    extra = np.minimum(phys - n_experts, (max_count - 1) * n_experts)
    if extra.max(initial=0) <= 16 * (max_count.max(initial=1) - 1):  # few redundant slots: the greedy is cheaper
        rows = np.arange(n_layers)
        for i in range(int(extra.max(initial=0))):
            live = extra > i
            score = np.where(count < max_count[:, None], weight / count, -np.inf)
            pick = np.argmax(score, axis=1)
            count[rows[live], pick[live]] += 1
        return count
    for lay in range(n_layers):
        m, x = int(max_count[lay]) - 1, int(extra[lay])
        if x <= 0 or m <= 0:
            continue
        q = weight[lay][:, None] / np.arange(1, m + 1)[None, :]  # [E, m] quotients
        e_idx, k_idx = np.divmod(np.arange(q.size), m)
        order = np.lexsort((k_idx, e_idx, -q.ravel()))[:x]
        count[lay] += np.bincount(e_idx[order], minlength=n_experts)
    return count


def pack(weight: np.ndarray, count: np.ndarray, slots: np.ndarray, speed: np.ndarray) -> np.ndarray:
    """hosts [H, L, E] bool: per layer, experts by descending per-replica load w / count go onto the
    count[l, e] distinct hosts with room and least (load + w) / speed (ties: lower host index).

    weight [L, E], count [L, E], slots [H, L] per-layer host slots, speed [H]. Vectorised over layers.
    """
    n_layers, n_experts = weight.shape
    n_hosts = slots.shape[0]
    per = weight / count
    order = np.argsort(-per, axis=1, kind="stable")  # [L, E]
    room = slots.T.copy()  # [L, H]
    load = np.zeros((n_layers, n_hosts))
    hosts = np.zeros((n_hosts, n_layers, n_experts), dtype=bool)
    rows = np.arange(n_layers)
    for i in range(n_experts):
        e = order[:, i]
        w = per[rows, e]
        c = count[rows, e]
        cost = np.where(room > 0, (load + w[:, None]) / speed[None, :], np.inf)
        rank = np.argsort(cost, axis=1, kind="stable")  # hosts by cost
        take = (np.arange(n_hosts)[None, :] < c[:, None]) & np.isfinite(np.take_along_axis(cost, rank, 1))
        lay, pos = np.nonzero(take)
        h = rank[lay, pos]
        room[lay, h] -= 1
        load[lay, h] += w[lay]
        hosts[h, lay, e[lay]] = True
    return hosts


def eplb(
    freq: np.ndarray,
    cluster: Cluster,
    *,
    coact: CoActivation | None = None,
    current: Placement | None = None,
    workload: Workload | None = None,
) -> Placement:
    """DeepSeek EPLB (global mode) with per-layer slots ∝ host memory and load ∝ 1 / host speed."""
    f = check_inputs(freq, cluster)
    weight = f.sum(axis=0)  # [L, E] global load
    slots = layer_slots(cluster.host_slots, weight.shape[0])  # [H, L]
    max_count = (slots > 0).sum(axis=0)  # [L] distinct hosts available per layer
    count = replicate(weight, slots.sum(axis=0), max_count)
    return Placement(pack(weight, count, slots, cluster.host_speed))
