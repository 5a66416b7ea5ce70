"""`prism`: the published two-stage placement (Wu et al., "Accelerating Edge Inference for Distributed
MoE Models with Latency-Optimized Expert Placement", 2025), reproduced as a baseline.

Stage 1 (layer-wise expert counts): a node spreads its slots over layers in proportion to the entropy
of its activation distribution in each layer — a layer whose usage is spread out needs more local
experts to cover the same share of calls than a peaked one.
Stage 2 (assignment): each node holds, per layer, its most used experts up to that count; then a
coverage repair gives every expert nobody chose a replica by evicting low-use duplicates.

Choices the paper leaves open, and ours:
- Budget unit: the node (sum of its hosts' slots); replicas are then spread over the node's hosts by
  load / speed (`assign_to_hosts`). Counts are per node because locality is per node.
- Entropy: Shannon entropy (natural log) of p[n, l, :] = f[n, l, :] / Σ_e f[n, l, e]; a layer the node
  never used has entropy 0. If all of a node's layers have entropy 0 (no traffic, or one expert per
  layer), its slots are split evenly.
- Rounding: largest remainder (ties: lower layer), each layer capped at E; slots a capped layer
  cannot take are re-split over the others (water-filling). No minimum per layer.
- Ties among equally used experts: lower expert index.
- Coverage repair: uncovered experts in descending total count Σ_n f; each goes to the node where it
  costs least on the proxy — a free slot first, else evicting that node's least used duplicate (an
  expert held by at least two nodes), cost f[n, victim] - f[n, uncovered]; ties: lower node index.
- No load balancing term: the published objective is the remote-call proxy alone.

Worked example (tests/placement/test_policies_golden.py): 2 nodes × 4 slots, 2 layers × 4 experts;
node 0 uses layer 0 as (4, 4, 0, 0) and layer 1 as (1, 1, 1, 1) → entropies (ln 2, ln 4) → counts
(1, 3); node 1 uses (0, 0, 3, 1) and (0, 0, 0, 8) → (0.56, 0) → (4, 0). Filling leaves expert (1, 3)
uncovered; node 1 evicts its duplicate (0, 0) (cost 0 - 8) rather than node 0 (cost 4 - 1).
"""

from __future__ import annotations

import numpy as np

from services.placement.policies._common import apportion, assign_to_hosts, fill_top, repair_coverage
from services.placement.types import Cluster, CoActivation, Placement, Workload, check_inputs


def layer_entropy(freq: np.ndarray) -> np.ndarray:
    """[N, L] Shannon entropy (nats) of each node's expert distribution per layer; 0 for no traffic."""
    total = freq.sum(axis=-1, keepdims=True)
    p = np.divide(freq, total, out=np.zeros_like(freq), where=total > 0)
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    return np.asarray(-(p * logp).sum(axis=-1))


def entropy_counts(freq: np.ndarray, node_slots: np.ndarray) -> np.ndarray:
    """[N, L] int slots per node and layer ∝ entropy, each <= E, summing to min(slots, L·E) per node."""
    n_nodes, n_layers, n_experts = freq.shape
    ent = layer_entropy(freq)
    caps = np.full(n_layers, n_experts)
    return np.stack(
        [apportion(min(int(node_slots[n]), n_layers * n_experts), ent[n], caps) for n in range(n_nodes)]
    )


def prism(
    freq: np.ndarray,
    cluster: Cluster,
    *,
    coact: CoActivation | None = None,
    current: Placement | None = None,
    workload: Workload | None = None,
) -> Placement:
    """Entropy-proportional layer counts, each node's top experts, coverage repair. freq [N, L, E]."""
    f = check_inputs(freq, cluster)
    return Placement(assign_to_hosts(prism_view(f, cluster.node_slots()), cluster, f))


def prism_view(f: np.ndarray, node_slots: np.ndarray, rank: np.ndarray | None = None) -> np.ndarray:
    """The node-level result [N, L, E] bool; rank: `ranks(f)` if the caller has it."""
    view = fill_top(f, entropy_counts(f, node_slots), rank)
    return repair_coverage(view, f, node_slots)
