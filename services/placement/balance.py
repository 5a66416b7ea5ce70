"""Expert balancedness, vLLM's EPLB definition, over Prism's hosts. Pure numpy; nothing here imports nats.

vLLM (`distributed/eplb`) logs, per MoE layer, the tokens each expert-parallel rank served, and the
balancedness Σ_l mean_r load[l, r] / Σ_l max_r load[l, r]: 1 when every rank of every layer is
equally busy, 1/R when one rank of R takes it all. Prism's ranks are expert hosts; a host's load in a
layer is the (token, expert) calls of its experts, an expert's calls split evenly over the hosts that
hold it (the same load model as the `eplb` objective, services/placement/objectives.py).

Shape legend: N nodes, L MoE layers, E experts, H hosts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def host_load(calls: np.ndarray, hosts: np.ndarray) -> np.ndarray:
    """[H, L] calls per host and layer, from `calls` [L, E] and `hosts` [H, L, E] (bool: holds)."""
    holders = hosts.sum(axis=0)  # [L, E]
    per_holder = np.divide(calls, holders, out=np.zeros(calls.shape, dtype=np.float64), where=holders > 0)
    load: np.ndarray = (hosts * per_holder).sum(axis=2)
    return load


def balancedness(calls: np.ndarray, hosts: np.ndarray) -> float | None:
    """Σ_l mean_h load / Σ_l max_h load, in (0, 1]; None when the hosts carry no load (no calls, or
    none on a held expert) or there is no host."""
    if hosts.shape[0] == 0:
        return None
    load = host_load(np.asarray(calls, dtype=np.float64), hosts)  # [H, L]
    busiest = float(load.max(axis=0).sum())
    if busiest <= 0:
        return None
    return float(load.mean(axis=0).sum()) / busiest


def holdings(experts: Sequence[Iterable[tuple[int, int]]], moe_layers: list[int], num_experts: int) -> np.ndarray:
    """[H, L, E] bool from each host's (absolute layer, expert) pairs; pairs of other layers are ignored."""
    row = {layer: i for i, layer in enumerate(moe_layers)}
    out = np.zeros((len(experts), len(moe_layers), num_experts), dtype=bool)
    for h, keys in enumerate(experts):
        for layer, expert in keys:
            if layer in row and 0 <= expert < num_experts:
                out[h, row[layer], expert] = True
    return out
