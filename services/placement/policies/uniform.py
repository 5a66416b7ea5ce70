"""`uniform`: vLLM's default linear expert placement, ignoring the frequencies; no replication.

Logical experts are taken in expert-major order (expert 0 of every layer, then expert 1, ...) and cut
into one contiguous block per host, the block sizes in proportion to the hosts' slots (largest
remainder). With equal hosts this is exactly vLLM's layout, host r holding experts [r·E/H, (r+1)·E/H)
of every layer; with unequal hosts a bigger host gets a proportionally wider expert range. Spare slots
stay empty.

Worked example: 2 hosts with 2 and 6 slots, 1 layer × 4 experts → shares 1 and 3 → host 0 holds
expert 0, host 1 experts 1, 2, 3.
"""

from __future__ import annotations

import numpy as np

from services.placement.policies._common import apportion, expert_major_blocks
from services.placement.types import Cluster, CoActivation, Placement, Workload, check_inputs


def uniform(
    freq: np.ndarray,
    cluster: Cluster,
    *,
    coact: CoActivation | None = None,
    current: Placement | None = None,
    workload: Workload | None = None,
) -> Placement:
    """Linear spread of the L·E logical experts over hosts ∝ slots. freq [N, L, E] gives only the shape."""
    f = check_inputs(freq, cluster)
    _, n_layers, n_experts = f.shape
    counts = apportion(n_layers * n_experts, cluster.host_slots, cluster.host_slots)
    return Placement(expert_major_blocks(counts, n_layers, n_experts))
