"""The latency model extended to routes: expected decode-step time when layers run away from home.

Shape legend: N nodes (homes h, executing nodes x, serving nodes m), L layers, E experts, K top-k,
R sampled token rows (or pseudo-batches at batch > 1).

Per home h and layer l, the executing node x = route[h, l] runs the layer for h's step of B_h tokens:
- its expert calls are served as in `latency_model`, but from x: the experts x holds are computed on
  x (compute only: no message, no round trip); the others go to the holder nearest to x as one
  group per serving node, paying rtt[x, m] + bytes there and back + the server's work;
- the layer takes max(local work at x, slowest remote group);
- work: every node m computes, per layer, the groups it serves for every home whose executing node
  sends them to m (the latency model's "all nodes step together"), over its speed. When the hosts
  are known (`cost` of a Placement), each call is computed by the host the simulator and the gating
  use (an expert held by several hosts of the node: shared evenly), and a node's work in a layer
  is its slowest host's: a 2-GPU node whose GPUs hold unequal shares of the calls it serves (its own
  and every home's that executes there) waits for the busier one. From a node view alone the hosts
  of a node are assumed to share its work evenly (what `LatencyModel` assumes);
- hops: when the executing node changes between layers (home → first, between segments, last →
  home for the head), the step pays one way: rtt[a, b] / 2 + B_h · bytes_per_token / bandwidth[a, b].
With stay-home routes this is exactly `LatencyModel` (same samples, same serving, same work).

What the cost above leaves out, and `load_step_times` adds (`load_cost`: what the `route` policy
chooses by, `policies/route.py`): the cost assumes every home steps at once
("all nodes step together"), so a node that executes a layer for three homes computes the three homes'
calls together in it. That is duty cycle 1: it over-rates a multi-GPU node, whose GPUs split that sum,
and it has no dense part (which runs on the executing node's first GPU, before the calls leave) and
no queueing. The load view of a routed layout, per home h:
- alone: h's step time with only h's work on the hosts (`alone_step_times`, duty cycle 0), plus the
  dense part of each layer on the first host of the node that runs it (`Workload.dense_time_s`);
- queueing: host k is busy occ[h, k] seconds per step of h (dense part and h's calls it serves,
  `occupancy`) and h runs `Workload.step_rate[h]` steps per second, so the other homes keep k busy
  ρ_k,-h = Σ_{h' ≠ h} rate[h'] · occ[h', k] of the time; with processor sharing (M/G/1-PS) h's work
  on k is stretched by 1 / (1 - ρ_k,-h): a delay of occ[h, k] · ρ / (1 - ρ), summed over the hosts
  (`queueing_delay`; ρ capped at RHO_CAP, an overloaded host). h's own steps never overlap each other,
  so its own load is left out. Without step rates the delay is 0.
- where the step rates are known (up to LOAD_VIEW_MAX_NODES), the load view is a rehearsal instead
  (`rehearsal.py`, the simulator on a sample of that traffic): processor sharing is the wrong shape of
  wait along routes, where a node runs other homes' segments one batch at a time and a pipeline's first
  stage spaces the steps out for the next; it ranked whole-layer layouts behind the pipeline where the
  simulator ran them faster. Its queueing stays in the row view, which it keeps more honest than the
  row view alone (without it, `route` lost to the best stay-home policy in four Mixtral bw cells).

Both the cost and the load view price a layer on expected work: an expert is active with probability
1 - e^-λ and the local work is the sum of those. With few tokens and large experts that understates
a step: at batch 1 with Mixtral's experts (0.6 ms each on an edge GPU) a node holding both experts of
a token computes them one after the other, 1.2 ms, where the expectation says 0.76, and one sent away
overlaps with the round trip. The row view (`row_step_times`) prices each home's sampled batches as
they come: per layer max(the batch's distinct experts at the executing node over its busiest GPU,
per other serving node the round trip + the batch's rows there and back + its distinct experts there),
hops as above, plus the same dense part and processor-sharing queueing (`view_costs`). It is each home's step as
bench/route_grid.py's judge times it, but it has no other home's work in a layer: where homes travel
together (the pipeline's, in the simulator) the load view's queueing ranked layouts better. So the two
are used together (`replaces`, `policies/route.py`): the row view rules out a layout more than
ROW_MARGIN above the best, the load view decides among the rest. Above LOAD_VIEW_MAX_NODES the load
view (one evaluation per home) is left out and the row view decides alone.

`route_dp` finds, for a node view and the work the current routes put on every node, each home's
cheapest route by dynamic programming over (layer, executing node). Pure numpy; no nats.
"""

from __future__ import annotations

import copy
from functools import cached_property
from typing import NamedTuple

import numpy as np

from services.placement.latency_model import LatencyModel, _run_lengths
from services.placement.rehearsal import Rehearsal
from services.placement.routes import stay_home
from services.placement.types import Placement

LOAD_VIEW_MAX_NODES = 16  # above, both views are the row view without queueing (`view_costs`)
RHO_CAP = 0.95  # utilisation a host's queueing is evaluated at, at most (an overloaded host: × 19)
ROW_MARGIN = 0.03  # a layout whose row view is this much above another's is out (module docstring)


class Views(NamedTuple):
    """Seconds per decode step of one layout on the two views (module docstring), migration included
    where the caller adds it."""

    load: float
    row: float

    def plus(self, seconds: float) -> Views:
        return Views(self.load + seconds, self.row + seconds)


def replaces(new: Views, old: Views, min_gain: float) -> bool:
    """Whether a layout with `new` views should replace one with `old`: the row view rules out a layout
    more than ROW_MARGIN above the other; within that margin the load view decides. Either way `new`
    must save `min_gain` of `old`'s cost in the view that decides (hysteresis)."""
    if new.row > old.row * (1.0 + ROW_MARGIN):
        return False
    if old.row > new.row * (1.0 + ROW_MARGIN):
        return new.row < old.row * (1.0 - min_gain)
    return new.load < old.load * (1.0 - min_gain)


class RouteModel(LatencyModel):
    """`LatencyModel` with routes; see the module docstring."""

    @cached_property
    def _seen(self) -> dict[tuple[bytes, bytes], Views]:
        return {}

    @cached_property
    def _rows_seen(self) -> dict[tuple[bytes, bytes], tuple[float, np.ndarray]]:
        return {}

    @cached_property
    def rehearsal(self) -> Rehearsal | None:
        """The rehearsal the load view is where the step rates are known, up to LOAD_VIEW_MAX_NODES; None
        also when no home with steps has sampled tokens (it would rehearse nothing: every layout 0)."""
        rate = self.workload.step_rate
        if rate is None or self.cluster.num_nodes > LOAD_VIEW_MAX_NODES:
            return None
        if not any(r > 0 and s.size for r, s in zip(rate.tolist(), self.samples, strict=True)):
            return None
        return Rehearsal(self)

    def hop_times(self) -> np.ndarray:
        """[N_home, N, N] seconds one hop from a to b takes for home h's batch (0 on the diagonal)."""
        n = self.cluster.num_nodes
        with np.errstate(divide="ignore"):
            one_way = self.workload.bytes_per_token / self.cluster.bandwidth_Bps
        one_way = np.where(np.eye(n, dtype=bool), 0.0, one_way)
        half = self.rtt / 2.0
        return half[None] + self.workload.batch[:, None, None] * one_way[None]

    def route_work(self, view: np.ndarray, table: np.ndarray, hosts: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(serve [N_x, L, E] serving node per executing node, work [N, L] seconds) under `table` [N, L];
        with `hosts` [H, L, E] a node's work is its slowest host's (module docstring)."""
        serve = self.serve(view)
        layers = np.arange(view.shape[1])
        if hosts is None or self.cluster.num_hosts == self.cluster.num_nodes:
            return serve, self.work(serve[table, layers[None, :], :], layers)
        return serve, self.host_work(hosts, serve, table)

    def served_load(self, serve: np.ndarray, table: np.ndarray) -> np.ndarray:
        """[N, L, E] expected work (s at speed 1.0) each node serves per step for each expert, summed
        over the homes whose executing node sends that call to it under `table` [N, L]."""
        n_nodes, n_layers, n_experts = serve.shape
        lay = np.arange(n_layers)
        srv = serve[table, lay[None, :], :]  # [N_home, L, E] node serving home h's calls
        idx = (srv * n_layers + lay[None, :, None]) * n_experts + np.arange(n_experts)
        load = np.bincount(idx.ravel(), weights=self.unit_work.ravel(), minlength=n_nodes * n_layers * n_experts)
        return load.reshape(n_nodes, n_layers, n_experts)

    def host_work(self, hosts: np.ndarray, serve: np.ndarray, table: np.ndarray) -> np.ndarray:
        """[N, L] seconds: per node and layer, its most loaded host's work over that host's speed.
        A node's load on an expert (`served_load`) goes to the host holding it; an expert held by
        several hosts of the node shares it evenly (requesters are spread over the replicas)."""
        cl = self.cluster
        held = np.asarray(hosts, dtype=bool)  # [H, L, E]
        load = self.served_load(serve, table)  # [N, L, E]
        count = np.zeros(load.shape)
        np.add.at(count, cl.host_node, held)
        share = np.divide(load, count, out=np.zeros_like(load), where=count > 0)
        per = (held * share[cl.host_node]).sum(axis=2) / cl.host_speed[:, None]  # [H, L]
        out = np.zeros(load.shape[:2])
        np.maximum.at(out, cl.host_node, per)
        return out

    def local_work(self, view: np.ndarray, serve: np.ndarray, table: np.ndarray, work: np.ndarray) -> np.ndarray:
        """[N_home, N_x, L]: work at x in layer l were home h's layer executed there: x's work under
        `table` minus what h put on x there, plus h's calls to the experts x holds."""
        n_nodes, n_layers, _ = view.shape
        lay = np.arange(n_layers)
        own = np.einsum("hle,xle->hxl", self.unit_work, view.astype(np.float64)) / self.speed[None, :, None]
        srv_home = serve[table, lay[None, :], :]  # [N_home, L, E] who serves h's calls now
        put = np.stack([(self.unit_work * (srv_home == x)).sum(axis=2) for x in range(n_nodes)], axis=1)
        put = put / self.speed[None, :, None]
        return np.asarray(np.maximum(work[None] - put + own, 0.0))

    def _row_times(self, serve: np.ndarray, work: np.ndarray, local: np.ndarray, ex_home: np.ndarray) -> np.ndarray:
        """T [N_home, L]: mean layer time of each home's rows when home h runs layer l on ex_home[h, l]."""
        n_nodes, n_layers, _ = serve.shape
        out = np.array(local[np.arange(n_nodes)[:, None], ex_home, np.arange(n_layers)[None, :]])
        if self.tok_req.size == 0:
            return out
        lay = np.arange(n_layers)[None, :, None]
        owner = self.tok_req if self.all_batch_1 else self.batch_req
        ex = ex_home[owner][:, :, None]  # [R, L, 1] executing node of each row
        ex_tok = ex_home[self.tok_req][:, :, None]
        srv, sent = self._sent(serve, ex_tok)
        loc = local[owner[:, None], ex[:, :, 0], lay[:, :, 0]]  # [R, L]
        if self.all_batch_1:
            copies = _run_lengths(srv) if self.per_expert else 1
            at = ex_tok * n_nodes + srv
            group = np.where(sent, self.rtt.ravel()[at] + copies * self.byte_time.ravel()[at] + work[srv, lay], 0.0)
            per = np.maximum(loc, group.max(axis=2))
        else:
            c = self._rows_sent(srv, sent, n_nodes)
            exb = ex[:, :, 0]  # [NB, L]
            trip = self.rtt[exb] + c * self.byte_time[exb] + work.T[None]
            per = np.maximum(loc, np.where(c > 0, trip, 0.0).max(axis=2))
        has = np.bincount(owner, minlength=n_nodes) > 0
        starts = np.searchsorted(owner, np.flatnonzero(has))
        counts = np.diff(np.append(starts, owner.size))
        out[has] = np.add.reduceat(per, starts, axis=0) / counts[:, None]
        return out

    def _sent(self, serve: np.ndarray, ex_tok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(srv [R, L, K] the node serving each row's experts from its executing node ex_tok [R, L, 1],
        sorted along K; sent [R, L, K] which of them leave as a row: every remote expert, or each remote
        node once without `per_expert_messages`)."""
        n_layers, n_experts = serve.shape[1:]
        lay = np.arange(n_layers)[None, :, None]
        srv = np.sort(serve.ravel()[(ex_tok * n_layers + lay) * n_experts + self.tok_sets], axis=2)
        sent = srv != ex_tok
        if not self.per_expert:
            sent[:, :, 1:] &= srv[:, :, 1:] != srv[:, :, :-1]
        return srv, sent

    def _rows_sent(self, srv: np.ndarray, sent: np.ndarray, n_nodes: int) -> np.ndarray:
        """[NB, L, N] rows each (pseudo-)batch sends to each node in each layer (`_sent`)."""
        n_batches, n_layers = self.batch_req.size, srv.shape[1]
        key = (self.tok_batch[:, None, None] * n_layers + np.arange(n_layers)[None, :, None]) * n_nodes + srv
        return np.bincount(key[sent], minlength=n_batches * n_layers * n_nodes).reshape(n_batches, n_layers, n_nodes)

    def route_layer_times(self, view: np.ndarray, table: np.ndarray, hosts: np.ndarray | None = None
                          ) -> np.ndarray:
        """T [N_home, L]: each home's mean layer time along its route `table` [N, L] (hosts: see
        `route_work`)."""
        serve, work = self.route_work(view, table, hosts)
        local = self.local_work(view, serve, table, work)
        return self._row_times(serve, work, local, table)

    def step_times(self, view: np.ndarray, table: np.ndarray, hosts: np.ndarray | None = None) -> np.ndarray:
        """[N_home] seconds of one decode step's MoE layers and hops along `table`."""
        return np.asarray(self.route_layer_times(view, table, hosts).sum(axis=1) + self.hops(table))

    def hops(self, table: np.ndarray) -> np.ndarray:
        """[N_home] seconds each home's step spends hopping along `table` [N, L], home first and last."""
        hop = self.hop_times()
        homes = np.arange(table.shape[0])[:, None]
        path = np.concatenate([homes, table, homes], axis=1)
        return np.asarray(hop[homes, path[:, :-1], path[:, 1:]].sum(axis=1))

    def routed_cost(self, view: np.ndarray, table: np.ndarray | None, hosts: np.ndarray | None = None) -> float:
        """Σ_h w_h · step time of home h; stay-home when `table` is None (then hosts are not looked at:
        the `latency` model, hosts sharing a node's work evenly)."""
        if table is None:
            return self.node_view_cost(view)
        return float(self.weight @ self.step_times(view, table, hosts))

    def cost(self, placement: Placement) -> float:
        view = placement.node_view(self.cluster)
        return self.routed_cost(view, placement.routes, placement.hosts)

    def occupancy(self, view: np.ndarray, table: np.ndarray, hosts: np.ndarray | None = None) -> np.ndarray:
        """[N_home, H] seconds host k computes per decode step of home h along `table` [N, L]: the dense
        part of each layer h runs on k's node, when k is that node's first host, and h's expert calls k
        serves (an expert held by several hosts of the node: shared evenly; without `hosts` [H, L, E]
        a node's hosts share its calls in proportion to their speed)."""
        cl = self.cluster
        n_nodes, n_layers, n_experts = view.shape
        lay = np.arange(n_layers)
        srv = self.serve(view)[table, lay[None, :], :]  # [N_home, L, E] node serving h's calls
        occ = np.zeros((n_nodes, cl.num_hosts))
        node_speed = np.bincount(cl.host_node, weights=cl.host_speed, minlength=n_nodes)
        if hosts is not None:
            held = np.asarray(hosts, dtype=bool)
            count = np.zeros(view.shape)
            np.add.at(count, cl.host_node, held)
        for k in range(cl.num_hosts):
            node = int(cl.host_node[k])
            if hosts is None:
                share = np.full((n_layers, n_experts), cl.host_speed[k] / node_speed[node])
            else:
                share = np.divide(held[k], count[node], out=np.zeros(count.shape[1:]), where=count[node] > 0)
            occ[:, k] = (self.unit_work * (srv == node) * share[None]).sum(axis=(1, 2)) / cl.host_speed[k]
        first, dense = self._dense_on_first_hosts()
        for h in range(n_nodes):
            np.add.at(occ[h], first[table[h]], dense[table[h]])
        return occ

    def _dense_on_first_hosts(self) -> tuple[np.ndarray, np.ndarray]:
        """([N] each node's first host, [N] seconds of one layer's dense part there)."""
        cl = self.cluster
        first = np.array([cl.hosts_of(n)[0] for n in range(cl.num_nodes)])
        return first, self.workload.dense_time_s / cl.host_speed[first]

    def queueing_delay(self, occ: np.ndarray) -> np.ndarray:
        """[N_home] seconds per step each home waits for the other homes' work on the hosts it uses, from
        occ [N_home, H] (`occupancy`) and `Workload.step_rate` (module docstring); 0 without rates."""
        rate = self.workload.step_rate
        if rate is None:
            return np.zeros(occ.shape[0])
        busy = rate[:, None] * occ  # [N_home, H] share of time h keeps k busy
        others = np.minimum(busy.sum(axis=0)[None, :] - busy, RHO_CAP)
        return np.asarray((occ * others / (1.0 - others)).sum(axis=1))

    def alone_step_times(self, view: np.ndarray, table: np.ndarray, hosts: np.ndarray | None = None
                         ) -> np.ndarray:
        """[N_home] `step_times` of each home with only its own work on the hosts (no other home's
        calls in the layer: duty cycle 0), dense part excluded."""
        n = table.shape[0]
        alone = copy.copy(self)
        out = np.empty(n)
        for h in range(n):
            alone.unit_work = np.where(np.arange(n)[:, None, None] == h, self.unit_work, 0.0)
            out[h] = alone.step_times(view, table, hosts)[h]
        return out

    def load_step_times(self, view: np.ndarray, table: np.ndarray | None, hosts: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """([N_home] step time alone with the dense part, [N_home] queueing delay) along `table`
        (stay-home when None); see the module docstring."""
        if table is None:
            table = stay_home(*view.shape[:2])
        return self._alone_with_dense(view, table, hosts), self.queueing_delay(self.occupancy(view, table, hosts))

    def _alone_with_dense(self, view: np.ndarray, table: np.ndarray, hosts: np.ndarray | None) -> np.ndarray:
        """[N_home] each home's step alone with the dense part on the nodes its route runs it on."""
        return np.asarray(self.alone_step_times(view, table, hosts) + self._dense_along(table))

    def row_step_times(self, view: np.ndarray, table: np.ndarray, hosts: np.ndarray | None = None) -> np.ndarray:
        """[N_home] each home's step alone along `table` [N, L] in the row view (module docstring), hops
        included, dense part excluded."""
        n_nodes, n_layers, _ = view.shape
        serve = self.serve(view)
        table = np.asarray(table, dtype=np.int64)
        n_batches = self.batch_req.size
        work = self._batch_work(serve, table, hosts)  # [NB, L, N]
        rows = self._rows_sent(*self._sent(serve, table[self.tok_req][:, :, None]), n_nodes).ravel()
        ex_b = table[self.batch_req]  # [NB, L]
        local = np.take_along_axis(work, ex_b[:, :, None], axis=2)[:, :, 0].ravel()
        groups = np.flatnonzero(rows)  # (batch, layer, node) that got rows: few of NB · L · N
        b_l, m = np.divmod(groups, n_nodes)
        x = ex_b.ravel()[b_l]
        trip = self.rtt[x, m] + rows[groups] * self.byte_time[x, m] + work.ravel()[groups]
        np.maximum.at(local, b_l, trip)
        per = local.reshape(n_batches, n_layers).sum(axis=1)  # [NB]
        layers = np.bincount(self.batch_req, weights=per, minlength=n_nodes) / np.maximum(self.nb, 1)
        return np.asarray(layers + self.hops(table))

    def _batch_work(self, serve: np.ndarray, table: np.ndarray, hosts: np.ndarray | None) -> np.ndarray:
        """[NB, L, N] seconds node m computes for one batch's calls in a layer under `table`: each
        distinct expert the batch chose that m serves, once, plus its rows' per-token time, over m's
        speed; with `hosts` [H, L, E] on the host holding it (several hosts of the node: shared evenly),
        the node waiting for its busiest host."""
        cl, wl = self.cluster, self.workload
        n_nodes, n_layers, n_experts = serve.shape
        n_bl = self.batch_req.size * n_layers
        key = (self.tok_batch[:, None, None] * n_layers + np.arange(n_layers)[None, :, None]) * n_experts
        chosen, calls = np.unique((key + self.tok_sets).ravel(), return_counts=True)  # (batch, layer, expert)
        bl, e = np.divmod(chosen, n_experts)
        lay = bl % n_layers
        m = serve[table[self.batch_req[bl // n_layers], lay], lay, e]
        t = wl.expert_time_s + calls * wl.expert_time_per_token_s  # at speed 1.0
        node_work = np.bincount(bl * n_nodes + m, weights=t / self.speed[m], minlength=n_bl * n_nodes)
        out = node_work.reshape(n_bl, n_nodes)  # exact for a node of one host
        if hosts is None or cl.num_hosts == n_nodes:
            return out.reshape(-1, n_layers, n_nodes)
        held = np.asarray(hosts, dtype=bool)
        count = np.zeros((n_nodes, n_layers, n_experts))
        np.add.at(count, cl.host_node, held)
        order = np.argsort(m, kind="stable")  # the calls grouped by serving node
        bounds = np.searchsorted(m[order], np.arange(n_nodes + 1))
        for node in np.flatnonzero(np.bincount(cl.host_node, minlength=n_nodes) > 1).tolist():
            at = order[bounds[node]:bounds[node + 1]]
            out[:, node] = 0.0
            for k in cl.hosts_of(node).tolist():
                share = held[k, lay[at], e[at]] / count[node, lay[at], e[at]]
                busy = np.bincount(bl[at], weights=t[at] * share / cl.host_speed[k], minlength=n_bl)
                out[:, node] = np.maximum(out[:, node], busy)
        return out.reshape(-1, n_layers, n_nodes)

    def load_cost(self, placement: Placement) -> float:
        """The load view the `route` policy chooses by (`view_costs`)."""
        return self.view_costs(placement).load

    def view_costs(self, placement: Placement) -> Views:
        """`placement` on the load view and on the row view (`_views`), remembered per layout: the policy,
        its split search and the migration rule ask again about the same layouts, and a rehearsal takes
        a second."""
        key = _layout_key(placement)
        views = self._seen.get(key)
        if views is None:
            views = self._seen[key] = self._views(placement)
        return views

    def row_cost(self, placement: Placement) -> float:
        """`placement` on the row view alone (`_views`): a candidate it rules out need not be rehearsed."""
        return self._row_and_queue(placement)[0]

    def _row_and_queue(self, placement: Placement) -> tuple[float, np.ndarray]:
        """(the row view, [N] each home's queueing), remembered per layout. The row view: Σ_h w_h (step
        alone paid batch by batch, `row_step_times`, + dense part + queueing); above LOAD_VIEW_MAX_NODES
        without queueing (it takes one evaluation per home)."""
        key = _layout_key(placement)
        if key not in self._rows_seen:
            view, table = self._view_and_table(placement)
            rows = self.row_step_times(view, table, placement.hosts) + self._dense_along(table)
            if self.cluster.num_nodes > LOAD_VIEW_MAX_NODES:
                queue = np.zeros(self.cluster.num_nodes)
            else:
                queue = self.queueing_delay(self.occupancy(view, table, placement.hosts))
            self._rows_seen[key] = (float(self.weight @ (rows + queue)), queue)
        return self._rows_seen[key]

    def _views(self, placement: Placement) -> Views:
        """`placement` on the load view and on the row view (`_row_and_queue`). The load view: where the
        step rates are known, the rehearsal's seconds per token (`rehearsal`); else Σ_h w_h (step alone
        with the dense part + queueing, `load_step_times`). Above LOAD_VIEW_MAX_NODES both are the row
        view without queueing."""
        row, queue = self._row_and_queue(placement)
        if self.cluster.num_nodes > LOAD_VIEW_MAX_NODES:
            return Views(row, row)
        if self.rehearsal is not None:
            return Views(self.rehearsal.cost(placement), row)
        alone = self._alone_with_dense(*self._view_and_table(placement), placement.hosts)
        return Views(float(self.weight @ (alone + queue)), row)

    def _view_and_table(self, placement: Placement) -> tuple[np.ndarray, np.ndarray]:
        view = placement.node_view(self.cluster)
        return view, placement.routes if placement.routes is not None else stay_home(*view.shape[:2])

    def _dense_along(self, table: np.ndarray) -> np.ndarray:
        """[N_home] each home's dense parts per step on the nodes its route runs them on."""
        return np.asarray(self._dense_on_first_hosts()[1][table].sum(axis=1))

    def exec_table(self, view: np.ndarray, table: np.ndarray) -> np.ndarray:
        """T [N_home, N_x, L]: home h's mean time in layer l if x ran it, the others keeping `table`."""
        serve, work = self.route_work(view, table)
        local = self.local_work(view, serve, table, work)
        n_nodes, n_layers = table.shape
        out = np.empty((n_nodes, n_nodes, n_layers))
        for x in range(n_nodes):
            out[:, x, :] = self._row_times(serve, work, local, np.full(table.shape, x, dtype=np.int64))
        return out

    def route_dp(self, view: np.ndarray, table: np.ndarray | None = None, rounds: int = 2) -> np.ndarray:
        """[N, L] routes: per home the cheapest path over (layer, executing node) on `exec_table`,
        re-solved `rounds` times with the work the previous routes put on each node."""
        n_nodes, n_layers, _ = view.shape
        cur = stay_home(n_nodes, n_layers) if table is None else np.asarray(table, dtype=np.int64)
        hop = self.hop_times()
        for _ in range(rounds):
            nxt = shortest_routes(self.exec_table(view, cur), hop)
            if np.array_equal(nxt, cur):
                break
            cur = nxt
        return cur


def _layout_key(placement: Placement) -> tuple[bytes, bytes]:
    return (np.packbits(placement.hosts).tobytes(), b"" if placement.routes is None else placement.routes.tobytes())


def shortest_routes(times: np.ndarray, hop: np.ndarray) -> np.ndarray:
    """[..., N_home, L] the cheapest route of every home at once: times [..., N_home, N_x, L] per
    executing node and layer (inf: not allowed; leading axes: independent layouts solved together),
    hop [N_home, N, N] seconds from a to b; home h's path starts and ends at h. Ties go to staying on
    the same node, then to the lower index; a home ends at home if it can."""
    *batch, n_homes, n_nodes, n_layers = times.shape
    homes = np.arange(n_homes)
    nodes = np.arange(n_nodes)
    back = np.zeros((n_layers, *batch, n_homes, n_nodes), dtype=np.int64)
    cost = hop[homes, homes, :] + times[..., 0]  # [..., H, X]
    back[0] = homes[:, None]
    for lay in range(1, n_layers):
        via = cost[..., :, :, None] + hop  # [..., H, from y, to x]
        low = via.min(axis=-2)  # [..., H, X]
        stay = via[..., nodes, nodes]
        keep = stay <= low
        back[lay] = np.where(keep, nodes, via.argmin(axis=-2))
        cost = np.where(keep, stay, low) + times[..., lay]
    total = cost + hop[homes, :, homes]  # [..., H, X]
    at_home = total[..., homes, homes]  # [..., H]
    x = np.where(at_home <= total.min(axis=-1), homes, np.argmin(total, axis=-1))
    routes = np.empty((*batch, n_homes, n_layers), dtype=np.int64)
    for lay in range(n_layers - 1, -1, -1):
        routes[..., lay] = x
        x = np.take_along_axis(back[lay], x[..., None], axis=-1)[..., 0]
    return routes
