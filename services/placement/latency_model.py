"""The latency cost model of the `latency` policy: expected MoE time of one decode step, per token.

Shape legend: N nodes, H hosts, L layers, E experts, K top-k, S sampled tokens per node,
B batch (tokens per decode step at a node), nb pseudo-batches of a node's sample.

Model, per requesting node n and MoE layer l, for one decode step of B_n tokens:
- Serving: an expert n holds is computed locally; otherwise by the holder nearest to n (lowest
  round trip, then highest bandwidth, then the next node index after n, cyclically, so that
  requesters spread over equally near replicas). The hosts of a node share its work
  evenly (capacity Σ host speed); host-level imbalance inside a node is not modelled.
- Work (queueing at the batch size): all nodes step together, so in layer l node m computes every
  group it serves for every requester. Requester n's step calls (l, e) λ = B_n · p[n, l, e] times
  (p = f / tokens, calls per token); its group for (l, e) is one invocation (a host runs each expert
  of a message on its own rows), present with probability 1 - exp(-λ), costing expert_time_s (weight read +
  launch, memory-bound at small batches) plus λ · expert_time_per_token_s:
  work[m, l] = Σ_{(n, e) served by m} (1 - e^-λ)·t_expert + λ·t_token, over speed_m.
- Network: a token's top-k are fetched in parallel, so the traffic of a step to node m is one group
  paying ONE round trip, and a step with no remote expert pays none. The group costs
  rtt[n, m] + 2 · c · bytes_per_token / bandwidth[n, m] + work[m, l] (there and back), where c counts
  a token once per remote expert on m (`Workload.per_expert_messages`, the default: what the gating
  sends, one row per (token, expert) in its one message per host) or once per node (a gating that
  would send each token once per node).
  A (token, layer) with all experts local pays no round trip; one with any remote expert pays one.
- The layer ends when the local work and the slowest remote group are done:
  T[n, l] = max(work[n, l], max_m group[n, l, m]).
- Co-activation enters through the sampled top-k sets of `CoActivation`: a node's sample is cut into
  pseudo-batches of B_n consecutive tokens (cyclically re-used when S < B_n) and T is averaged over
  them, so "any remote in the batch" and "distinct remote nodes" come from real sets, not from
  independence assumptions.
- Not modelled: link contention between requesters, stragglers, the dense part (same for every
  placement).

`expected_latency` = Σ_n w_n Σ_l T[n, l] (seconds per decode step, token-weighted mean over nodes,
w_n ∝ tokens of node n). Pure numpy.
"""

from __future__ import annotations

import numpy as np

from services.placement.errors import InvalidInputError
from services.placement.types import Cluster, CoActivation, Placement, Workload, check_inputs


def default_samples(num_nodes: int, num_layers: int) -> int:
    """Tokens per node to synthesise when no CoActivation is given: 64, fewer on big clusters so the
    sample stays near 2^16 (token, layer) rows (sampling and evaluation cost), never under 16."""
    return int(np.clip(2**16 // max(num_nodes * num_layers, 1), 16, 64))


def max_samples(num_nodes: int, num_layers: int) -> int:
    """Sampled tokens per node the model evaluates: all up to 2^17 (token, layer) rows in total, so
    big clusters stay fast (64 × 58 layers → 35 per node), never under 16."""
    return max(16, 2**17 // max(num_nodes * num_layers, 1))


def _evenly(rows: np.ndarray, cap: int) -> np.ndarray:
    """At most `cap` of `rows`, evenly spaced (deterministic)."""
    if rows.size <= cap:
        return rows
    return rows[np.linspace(0, rows.size - 1, cap).astype(np.int64)]


def _pseudo_batches(valid: int, batch: int) -> np.ndarray:
    """[nb, B] indices into a node's `valid` sample rows, cyclic when valid < batch."""
    nb = max(1, valid // batch)
    return np.arange(nb * batch).reshape(nb, batch) % valid


def _run_lengths(a: np.ndarray) -> np.ndarray:
    """How many entries of its row (last axis, K small) equal each entry: [.., K] → [.., K] int."""
    out = np.zeros(a.shape, dtype=np.int64)
    for j in range(a.shape[-1]):
        out += a == a[..., j : j + 1]
    return out


class LatencyModel:
    """Precomputed context for evaluating many placements of one (cluster, f, coact, workload)."""

    def __init__(
        self,
        cluster: Cluster,
        freq: np.ndarray,
        coact: CoActivation | None = None,
        workload: Workload | None = None,
    ) -> None:
        f = check_inputs(freq, cluster)
        n_nodes, n_layers, _ = f.shape
        self.cluster = cluster
        self.workload = workload if workload is not None else Workload.uniform(n_nodes)
        if self.workload.batch.shape != (n_nodes,):
            raise InvalidInputError(f"Workload.batch has {self.workload.batch.shape[0]} nodes, counts have {n_nodes}")
        self.coact = coact if coact is not None else CoActivation.independent(
            f, self.workload.top_k, samples_per_node=default_samples(n_nodes, n_layers)
        )
        if self.coact.sets.shape[0] != n_nodes or self.coact.sets.shape[2] != n_layers:
            raise InvalidInputError(
                f"CoActivation sets {self.coact.sets.shape} do not match counts [N={n_nodes}, L={n_layers}, E]"
            )
        tokens = self.coact.tokens
        self.p = np.divide(f, tokens[..., None], out=np.zeros_like(f), where=tokens[..., None] > 0)
        # Work a requester's step brings to whoever serves (l, e), on a speed-1.0 host: each requester's
        # group is its own invocation (one request per expert), active with probability 1 - e^-calls.
        calls = self.p * self.workload.batch[:, None, None]  # [N, L, E] calls per step
        wl = self.workload
        self.unit_work = -np.expm1(-calls) * wl.expert_time_s + calls * wl.expert_time_per_token_s
        tok = tokens.max(axis=1)
        self.weight = tok / tok.sum() if tok.sum() > 0 else np.full(n_nodes, 1.0 / n_nodes)
        self.speed = cluster.node_speed()
        self.rtt = cluster.rtt_s
        with np.errstate(divide="ignore"):
            per_byte = 2.0 * self.workload.bytes_per_token / cluster.bandwidth_Bps  # there and back
            self.byte_time = np.where(np.eye(n_nodes, dtype=bool), 0.0, per_byte)
        # Serving order per requester: itself, then by (rtt, -bandwidth, next index cyclically); the
        # cyclic tie-break spreads requesters over equally near replicas instead of piling on one.
        cyc = (np.arange(n_nodes)[None, :] - np.arange(n_nodes)[:, None]) % n_nodes
        self.order = np.stack(
            [np.lexsort((cyc[n], -cluster.bandwidth_Bps[n], self.rtt[n])) for n in range(n_nodes)]
        )
        self.rank = np.argsort(self.order, axis=1)
        self.uniform_links = bool(np.all(self.order == np.argsort(cyc, axis=1)))
        valid = self.coact.valid
        cap = max_samples(n_nodes, n_layers)
        self.samples = [_evenly(np.flatnonzero(valid[n]), cap) for n in range(n_nodes)]
        self.batches = [
            _pseudo_batches(s.size, int(self.workload.batch[n])) if s.size else np.zeros((0, 1), dtype=int)
            for n, s in enumerate(self.samples)
        ]
        self._flatten_tokens()

    def _flatten_tokens(self) -> None:
        """All requesters' batched sample tokens in one array, so evaluation has no per-node loop.

        tok_sets [R, L, K] experts, tok_req [R] requester, tok_batch [R] global batch id (batches are
        contiguous per requester), batch_req [NB] requester of each batch, nb [N] batches per node.
        """
        sets = [self.coact.sets[n][self.samples[n][b.ravel()]] for n, b in enumerate(self.batches)]
        self.tok_sets = np.concatenate(sets).astype(np.int64)
        self.tok_req = np.concatenate([np.full(b.size, n) for n, b in enumerate(self.batches)]).astype(np.int64)
        self.nb = np.array([b.shape[0] if b.size else 0 for b in self.batches])
        self.batch_req = np.repeat(np.arange(self.nb.size), self.nb)
        self.tok_batch = np.repeat(np.arange(self.batch_req.size), [b.shape[1] for b in self.batches for _ in b])
        self.all_batch_1 = bool(np.all([b.shape[1] == 1 for b in self.batches if b.size]))
        self.per_expert = self.workload.per_expert_messages

    def serve(self, view: np.ndarray) -> np.ndarray:
        """[N, L', E] int: node serving (l, e) for each requester, from view [N, L', E] bool (all covered)."""
        n_nodes = view.shape[0]
        if self.uniform_links:
            # Equal links: the next holder after n, cyclically, so requesters spread over replicas.
            nxt = np.empty(view.shape, dtype=np.int64)
            after = np.argmax(view, axis=0)  # wraps around to the first holder
            for m in range(n_nodes - 1, -1, -1):
                nxt[m] = after = np.where(view[m], m, after)
            return np.where(view, np.arange(n_nodes)[:, None, None], np.roll(nxt, -1, axis=0))
        out = np.empty(view.shape, dtype=np.int64)
        for n in range(n_nodes):
            key = np.where(view, self.rank[n][:, None, None], n_nodes)
            out[n] = np.argmin(key, axis=0)
        return out

    def work(self, serve: np.ndarray, layers: np.ndarray) -> np.ndarray:
        """[N, L'] seconds each node computes per step in each of `layers` (see `unit_work`)."""
        n_nodes, n_sub, _ = serve.shape
        idx = serve * n_sub + np.arange(n_sub)[None, :, None]
        per = np.bincount(idx.ravel(), weights=self.unit_work[:, layers, :].ravel(), minlength=n_nodes * n_sub)
        return np.asarray(per.reshape(n_nodes, n_sub) / self.speed[:, None])

    def layer_times(self, view: np.ndarray, layers: np.ndarray) -> np.ndarray:
        """T [N, L']: mean step time of each requester in each of `layers`; view [N, L', E] bool.

        The layers may repeat (the local search evaluates variants of one layer side by side).
        """
        n_nodes, n_sub, n_experts = view.shape
        serve = self.serve(view)
        work = self.work(serve, layers)
        out = work.copy()  # a node without sampled tokens only computes
        if self.tok_req.size == 0:
            return out
        req = self.tok_req[:, None, None]
        lay = np.arange(n_sub)[None, :, None]
        srv = np.sort(serve.ravel()[(req * n_sub + lay) * n_experts + self.tok_sets[:, layers, :]], axis=2)
        sent = srv != req
        if not self.per_expert:  # a token goes once to each distinct remote node
            sent[:, :, 1:] &= srv[:, :, 1:] != srv[:, :, :-1]
        if self.all_batch_1:
            copies = _run_lengths(srv) if self.per_expert else 1  # the token's experts on that node
            at = req * n_nodes + srv  # [R, L', K] flat (requester, server)
            rtt, bt = self.rtt.ravel()[at], self.byte_time.ravel()[at]
            group = np.where(sent, rtt + copies * bt + work[srv, lay], 0.0).max(axis=2)
            per = np.maximum(work[self.tok_req], group)  # [R, L']
        else:
            n_batches = self.batch_req.size
            key = (self.tok_batch[:, None, None] * n_sub + lay) * n_nodes + srv
            c = np.bincount(key[sent], minlength=n_batches * n_sub * n_nodes).reshape(n_batches, n_sub, n_nodes)
            b_req = self.batch_req
            trip = self.rtt[b_req][:, None, :] + c * self.byte_time[b_req][:, None, :] + work.T[None]
            per = np.maximum(work[b_req], np.where(c > 0, trip, 0.0).max(axis=2))  # [NB, L']
        owner = self.tok_req if self.all_batch_1 else self.batch_req  # sorted: rows grouped by requester
        has = np.bincount(owner, minlength=n_nodes) > 0
        starts = np.searchsorted(owner, np.flatnonzero(has))
        counts = np.diff(np.append(starts, owner.size))
        out[has] = np.add.reduceat(per, starts, axis=0) / counts[:, None]
        return out

    def node_view_cost(self, view: np.ndarray) -> float:
        """Σ_n w_n Σ_l T[n, l] for a node-level view [N, L, E] bool (every expert covered)."""
        t = self.layer_times(view, np.arange(view.shape[1]))
        return float(self.weight @ t.sum(axis=1))

    def cost(self, placement: Placement) -> float:
        return self.node_view_cost(placement.node_view(self.cluster))


def expected_latency(
    placement: Placement,
    cluster: Cluster,
    freq: np.ndarray,
    coact: CoActivation | None = None,
    workload: Workload | None = None,
) -> float:
    """Expected MoE time of one decode step (s), token-weighted over nodes; see the module docstring.

    freq [N, L, E] counts; coact defaults to independent sets drawn ∝ f with workload.top_k experts;
    workload defaults to batch 1 everywhere. The placement must cover every expert. A placement with
    routes is costed along them (`route_model.RouteModel`: hops, and each layer from where it runs).
    """
    if placement.routes is not None:
        from services.placement.route_model import RouteModel  # it extends this module's model

        return RouteModel(cluster, freq, coact, workload).cost(placement)
    return LatencyModel(cluster, freq, coact, workload).cost(placement)
