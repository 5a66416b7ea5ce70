"""Local search on a node-level view under the latency model (used by the `latency` policy).

Shape legend: N nodes, L layers, E experts.

A move is one node trading a slot between two layers: it drops its least used duplicate in layer l1
(an expert another node also holds, so coverage stays) and adds its most used missing expert in
layer l2 ≠ l1; or, with a free slot, only the add. The latency model's layer times depend on one
layer's view only, so a move's change is exactly Δ_drop[n, l1] + Δ_add[n, l2], and after a move only
the two touched layers need re-evaluating. Each step takes the best move over all nodes (ties: lower
node, then lower layers) while it improves the cost by more than a relative tolerance; migration
costs enter Δ per replica loaded that `current` lacked.
"""

from __future__ import annotations

import numpy as np

from services.placement.latency_model import LatencyModel

REL_TOL = 1e-9


class LocalSearch:
    """Mutable search state; `run(max_moves)` returns the improved view [N, L, E] bool."""

    def __init__(
        self,
        model: LatencyModel,
        freq: np.ndarray,
        view: np.ndarray,
        node_slots: np.ndarray,
        mig: np.ndarray,
    ) -> None:
        self.model, self.f, self.mig = model, freq, mig  # mig [N, L, E]: cost of loading (n, l, e)
        self.v = view.copy()
        self.n_nodes, self.n_layers, _ = view.shape
        self.free = np.asarray(node_slots) - self.v.sum(axis=(1, 2))
        self.t = model.layer_times(self.v, np.arange(self.n_layers))  # [N, L]
        self.d_add = np.full((self.n_nodes, self.n_layers), np.inf)
        self.d_drop = np.full((self.n_nodes, self.n_layers), np.inf)
        self.e_add = np.full((self.n_nodes, self.n_layers), -1)
        self.e_drop = np.full((self.n_nodes, self.n_layers), -1)
        self._refresh(np.arange(self.n_layers))

    def cost(self) -> float:
        return float(self.model.weight @ self.t.sum(axis=1))

    def _variants(self, layers: np.ndarray, experts: np.ndarray, ok: np.ndarray | np.bool_, value: bool) -> np.ndarray:
        """Δ latency [N, L'] of node n setting v[n, layers[j], experts[n, j]] = value, for all n at once.

        The N variants of the L' layers are evaluated as N·L' independent pseudo-layers in one call.
        """
        n_nodes, n_sub = self.n_nodes, layers.size
        sub = np.broadcast_to(self.v[:, layers, :][:, None], (n_nodes, n_nodes, n_sub, self.v.shape[2])).copy()
        var, lay = np.nonzero(ok)  # variant node, layer position
        sub[var, var, lay, experts[var, lay]] = value
        flat = sub.reshape(n_nodes, n_nodes * n_sub, -1)
        t_new = self.model.layer_times(flat, np.tile(layers, n_nodes)).reshape(n_nodes, n_nodes, n_sub)
        delta = np.einsum("m,mnl->nl", self.model.weight, t_new - self.t[:, None, layers])
        return np.where(ok, delta, np.inf)

    def _refresh(self, layers: np.ndarray) -> None:
        """Recompute every node's best add / drop and their Δ in `layers`."""
        v, f = self.v[:, layers], self.f[:, layers]  # [N, L', E]
        cnt = v.sum(axis=0)
        add = np.argmax(np.where(v, -np.inf, f), axis=2)  # [N, L']
        droppable = v & (cnt >= 2)
        drop = np.argmin(np.where(droppable, f, np.inf), axis=2)
        rows, cols = np.arange(self.n_nodes)[:, None], layers[None, :]
        self.e_add[:, layers], self.e_drop[:, layers] = add, drop
        self.d_add[:, layers] = self._variants(layers, add, ~v.all(axis=2), True) + self.mig[rows, cols, add]
        self.d_drop[:, layers] = self._variants(layers, drop, droppable.any(axis=2), False) - self.mig[rows, cols, drop]

    def _best_move(self) -> tuple[float, int, int, int]:
        """(Δ, node, drop layer or -1, add layer) of the best move; ties: lower node, then layers."""
        best = (np.inf, -1, -1, -1)
        for n in range(self.n_nodes):
            if self.free[n] > 0:
                l2 = int(np.argmin(self.d_add[n]))
                cand = (float(self.d_add[n, l2]), n, -1, l2)
            else:
                value, l1, l2 = _best_pair(self.d_drop[n], self.d_add[n])
                cand = (value, n, l1, l2)
            best = min(best, cand)
        return best

    def _apply(self, n: int, l1: int, l2: int) -> None:
        if l1 >= 0:
            self.v[n, l1, self.e_drop[n, l1]] = False
        else:
            self.free[n] -= 1
        self.v[n, l2, self.e_add[n, l2]] = True
        touched = np.array(sorted({l2} | ({l1} if l1 >= 0 else set())))
        self.t[:, touched] = self.model.layer_times(self.v[:, touched, :], touched)
        self._refresh(touched)

    def run(self, max_moves: int) -> np.ndarray:
        for _ in range(max_moves):
            delta, n, l1, l2 = self._best_move()
            if not delta < -REL_TOL * max(self.cost(), 1e-300):
                break
            self._apply(n, l1, l2)
        return self.v


def _best_pair(d: np.ndarray, a: np.ndarray) -> tuple[float, int, int]:
    """min over l1 != l2 of d[l1] + a[l2], as (value, l1, l2); d, a [L]."""
    l1, l2 = int(np.argmin(d)), int(np.argmin(a))
    if l1 != l2:
        return float(d[l1] + a[l2]), l1, l2
    d2, a2 = d.copy(), a.copy()
    d2[l1], a2[l2] = np.inf, np.inf
    k1, k2 = int(np.argmin(d2)), int(np.argmin(a2))
    return min((float(d[l1] + a2[k2]), l1, k2), (float(d2[k1] + a[l2]), k1, l2))
