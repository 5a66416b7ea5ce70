"""`redundance`: `uniform`, then every spare slot holds a copy of one of the globally hottest experts.

Hotness is the total count Σ_n f[n, l, e] over all nodes (the policy is not locality-aware, like the
redundant experts of vLLM/SGLang). Hosts are filled in index order; each host's spare slots take the
hottest logical experts its node does not hold yet (a second copy inside one node would not save a
network call), ties to the lower (layer, expert) index. So with room to spare, the hottest experts end
up on every node.

Worked example: 2 hosts with 3 slots each, 1 layer × 4 experts, totals (1, 9, 5, 2):
uniform gives host 0 experts {0, 1}, host 1 {2, 3}; host 0's spare slot takes the hottest expert
it lacks, expert 2 (5), host 1's takes expert 1 (9).
"""

from __future__ import annotations

import numpy as np

from services.placement.policies.uniform import uniform
from services.placement.types import Cluster, CoActivation, Placement, Workload, check_inputs


def redundance(
    freq: np.ndarray,
    cluster: Cluster,
    *,
    coact: CoActivation | None = None,
    current: Placement | None = None,
    workload: Workload | None = None,
) -> Placement:
    """Uniform layout plus copies of the globally hottest experts in the spare slots. freq [N, L, E]."""
    f = check_inputs(freq, cluster)
    hosts = uniform(f, cluster).hosts.copy()
    heat = f.sum(axis=0).ravel()  # [L·E]
    order = np.argsort(-heat, kind="stable")
    node_has = np.zeros((cluster.num_nodes, heat.size), dtype=bool)
    np.logical_or.at(node_has, cluster.host_node, hosts.reshape(cluster.num_hosts, -1))
    for h in range(cluster.num_hosts):
        spare = int(cluster.host_slots[h]) - int(hosts[h].sum())
        if spare <= 0:
            continue
        n = cluster.host_node[h]
        take = order[~node_has[n, order]][:spare]
        hosts[h].reshape(-1)[take] = True
        node_has[n, take] = True
    return Placement(hosts)
