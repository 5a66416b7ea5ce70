"""`optimal`: the exact minimum of the remote-call proxy Σ f[n, l, e] · (node n lacks (l, e)).

With equal expert sizes the problem is, on x[n, l, e] ∈ {0, 1} (node n holds (l, e)):

    maximise  Σ f[n, l, e] · x[n, l, e]               (the calls kept local)
    s.t.      Σ_{l, e} x[n, l, e] <= slots_n          for every node n      (capacity)
              Σ_n x[n, l, e] >= 1                      for every (l, e)      (coverage)
              0 <= x <= 1

Every variable appears in exactly one node row and one expert row: the constraint matrix is the
incidence matrix of a bipartite graph, which is totally unimodular, so every vertex of the LP is
integral. HiGHS's dual simplex returns a vertex; the result is checked for integrality anyway and,
should a solver ever return a fractional point, re-solved as a MILP. Node-level sets are then spread
over each node's hosts by load / speed (`assign_to_hosts`), which changes nothing on the proxy.

Slots the optimum leaves empty (only when the remaining experts have zero count) stay empty.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from services.placement.errors import InfeasibleError
from services.placement.policies._common import assign_to_hosts
from services.placement.types import Cluster, CoActivation, Placement, Workload, check_inputs

INTEGRALITY_TOL = 1e-6


def _constraints(n_nodes: int, n_cells: int) -> sp.csr_matrix:
    """Rows: N capacity rows (+x) then L·E coverage rows (-x); columns x[n, c] n-major."""
    cols = np.arange(n_nodes * n_cells)
    cap = sp.csr_matrix((np.ones(cols.size), (cols // n_cells, cols)), shape=(n_nodes, cols.size))
    cov = sp.csr_matrix((-np.ones(cols.size), (cols % n_cells, cols)), shape=(n_cells, cols.size))
    return sp.vstack([cap, cov], format="csr")


def solve_node_sets(freq: np.ndarray, node_slots: np.ndarray) -> np.ndarray:
    """The exact proxy optimum at node level: [N, L, E] bool. freq [N, L, E] >= 0, node_slots [N]."""
    n_nodes, n_layers, n_experts = freq.shape
    n_cells = n_layers * n_experts
    a = _constraints(n_nodes, n_cells)
    b = np.concatenate([np.asarray(node_slots, dtype=np.float64), -np.ones(n_cells)])
    c = -freq.reshape(-1)
    res = linprog(c, A_ub=a, b_ub=b, bounds=(0.0, 1.0), method="highs-ds")
    if res.status != 0:
        raise InfeasibleError(f"the placement LP has no solution ({res.message})")
    x = res.x
    if np.max(np.abs(x - np.round(x))) > INTEGRALITY_TOL:  # cannot happen at a vertex; kept as a guard
        res = milp(
            c,
            constraints=LinearConstraint(a, -np.inf, b),
            integrality=np.ones(c.size),
            bounds=Bounds(0.0, 1.0),
        )
        if res.status != 0:
            raise InfeasibleError(f"the placement MILP has no solution ({res.message})")
        x = res.x
    return np.asarray(np.round(x).reshape(n_nodes, n_layers, n_experts) > 0)


def optimal(
    freq: np.ndarray,
    cluster: Cluster,
    *,
    coact: CoActivation | None = None,
    current: Placement | None = None,
    workload: Workload | None = None,
) -> Placement:
    """The exact minimum of the proxy Σ f · remote (LP, HiGHS dual simplex). freq [N, L, E]."""
    f = check_inputs(freq, cluster)
    view = solve_node_sets(f, cluster.node_slots())
    return Placement(assign_to_hosts(view, cluster, f))
