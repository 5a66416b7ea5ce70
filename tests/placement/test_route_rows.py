"""The route model's row view (each sampled batch pays for its own calls) and how `route` and the
migration rule use it beside the load view (`route_model.replaces`)."""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.placement import Cluster, CoActivation, Placement, Workload
from services.placement.objectives import judge
from services.placement.route_model import ROW_MARGIN, RouteModel, Views, replaces

route_module = importlib.import_module("services.placement.policies.route")

EXPERT_S, RTT_S, BPS, ROW_BYTES = 600e-6, 0.4e-3, 250e6, 8192


def _model(gpus: tuple[int, ...] = (1, 1), *, per_expert: bool = True) -> RouteModel:
    """Nodes of `gpus` hosts, one layer of four experts; every token of either home chooses experts 0
    and 1 (top-2, batch 1), as large experts as Mixtral's on an edge GPU."""
    f = np.zeros((2, 1, 4))
    f[:, 0, :2] = 100.0
    sets = np.tile(np.array([0, 1]), (2, 8, 1, 1))  # [N, S, L, K]
    coact = CoActivation(np.full((2, 1), 100.0), sets)
    c = Cluster(np.repeat(np.arange(len(gpus)), gpus), np.full(sum(gpus), 4), np.ones(sum(gpus)),
                np.array(RTT_S), np.array(BPS))
    wl = Workload.uniform(2, 1, top_k=2, bytes_per_token=ROW_BYTES, expert_time_s=EXPERT_S,
                          per_expert_messages=per_expert)
    return RouteModel(c, f, coact, wl)


def _view(node0: list[int], node1: list[int]) -> np.ndarray:
    view = np.zeros((2, 1, 4), dtype=bool)
    view[0, 0, node0] = True
    view[1, 0, node1] = True
    return view


def test_a_batch_pays_for_each_expert_it_calls_where_the_load_view_pays_the_expectation() -> None:
    m = _model()
    home = np.array([[0], [1]])
    both_local = _view([0, 1, 2, 3], [0, 1, 2, 3])
    rows = m.row_step_times(both_local, home)
    assert rows == pytest.approx([2 * EXPERT_S, 2 * EXPERT_S])  # two experts, one after the other
    # the load view's expected work: each expert active with probability 1 - e^-1 per step
    alone = m.alone_step_times(both_local, home)
    assert alone == pytest.approx(2 * -np.expm1(-1.0) * EXPERT_S * np.ones(2))
    # expert 1 only on node 1: home 0 computes expert 0 while its row goes there and back
    split = _view([0, 2, 3], [0, 1, 2, 3])
    trip = RTT_S + 2 * ROW_BYTES / BPS + EXPERT_S
    assert m.row_step_times(split, home)[0] == pytest.approx(max(EXPERT_S, trip))
    # both on node 1: one row per expert there and back, or the row once for both
    away = _view([2, 3], [0, 1, 2, 3])
    both = RTT_S + 2 * EXPERT_S
    assert m.row_step_times(away, home)[0] == pytest.approx(both + 2 * 2 * ROW_BYTES / BPS)
    once = _model(per_expert=False)
    assert once.row_step_times(away, home)[0] == pytest.approx(both + 2 * ROW_BYTES / BPS)
    assert once.row_step_times(_view([1, 2, 3], [0, 1, 2, 3]), home)[0] == pytest.approx(trip)  # expert 0 away


def test_a_node_waits_for_its_busiest_gpu() -> None:
    m = _model((1, 2))
    view = _view([0, 1, 2, 3], [0, 1, 2, 3])
    routes = np.array([[1], [1]])  # both homes run the layer on node 1, whose two GPUs hold the experts
    apart = np.zeros((3, 1, 4), dtype=bool)
    apart[0] = True
    apart[1, 0, [0, 2]] = True
    apart[2, 0, [1, 3]] = True
    together = apart.copy()
    together[1, 0] = [True, True, False, False]
    together[2, 0] = [False, False, True, True]
    hop = m.hop_times()
    there_and_back = hop[0, 0, 1] + hop[0, 1, 0]
    assert m.row_step_times(view, routes, apart)[0] == pytest.approx(there_and_back + EXPERT_S)
    assert m.row_step_times(view, routes, together)[0] == pytest.approx(there_and_back + 2 * EXPERT_S)
    assert m.row_step_times(view, routes)[0] == pytest.approx(there_and_back + EXPERT_S)  # hosts unknown: even


def test_replaces_lets_the_row_view_rule_out_and_the_load_view_decide_within_its_margin() -> None:
    old = Views(load=10.0, row=10.0)
    assert replaces(Views(9.0, 10.0), old, 0.05)  # same row view: the load view saves 10%
    assert not replaces(Views(9.9, 10.0), old, 0.05)  # 1% saved: under min_gain
    assert not replaces(Views(5.0, 10.0 * (1 + 2 * ROW_MARGIN)), old, 0.05)  # ruled out by the row view
    assert replaces(Views(20.0, 10.0 * (1 - 2 * ROW_MARGIN)), old, 0.05)  # the old one is ruled out
    assert not replaces(Views(20.0, 10.0 * (1 - 2 * ROW_MARGIN)), old, 0.5)  # but must save min_gain there


def test_route_and_the_migration_rule_rule_out_a_stay_home_layout_the_load_view_flatters() -> None:
    """Mixtral's experts at batch 1: a node holding both experts of its tokens computes them one after
    the other, 1.2 ms a step, where the load view expects 0.76; sending one to the other node overlaps
    it with the round trip (1.07 ms). The load view prefers holding both; the row view rules that out."""
    m = _model()
    home = np.array([[0], [1]])
    whole = Placement(_view([0, 1, 2, 3], [0, 1, 2, 3]))
    apart = Placement(_view([0, 2, 3], [1, 2, 3]))
    w, a = m.view_costs(whole), m.view_costs(apart)
    assert w.load < a.load
    assert w.row > a.row * (1 + ROW_MARGIN)
    pipe = Placement(whole.hosts, routes=home)  # stay-home routes written out: the baseline never wins here
    assert route_module._choose([(0.0, whole), (0.0, apart)], pipe, m, None, 0.0) is apart
    assert route_module._choose([(0.0, whole), (0.0, apart)], pipe, m, whole, 0.0) is apart
    verdict = judge("route", m.p * 100.0, whole, apart, m.cluster, coact=m.coact, workload=m.workload,
                    migration_cost_calls=0.0)
    assert verdict.accept
    assert not judge("route", m.p * 100.0, apart, whole, m.cluster, coact=m.coact, workload=m.workload,
                     migration_cost_calls=0.0).accept


def _row_times_by_loops(m: RouteModel, hosts: np.ndarray, table: np.ndarray) -> np.ndarray:
    """`row_step_times` written plainly: per home, per sampled batch and layer, each serving node's work
    from its hosts (an expert held by several hosts of the node: shared evenly; the busiest host), then
    max(local, every remote trip), hops added."""
    cl, wl = m.cluster, m.workload
    view = Placement(hosts).node_view(cl)
    serve = m.serve(view)
    n_nodes, n_layers, _ = view.shape
    count = np.zeros(view.shape)
    np.add.at(count, cl.host_node, hosts)
    hop = m.hop_times()
    out = np.zeros(n_nodes)
    for h in range(n_nodes):
        batches = [b for b in range(m.batch_req.size) if m.batch_req[b] == h]
        total = 0.0
        for b in batches:
            tokens = np.flatnonzero(m.tok_batch == b)
            for lay in range(n_layers):
                x = int(table[h, lay])
                calls: dict[int, int] = {}
                for t in tokens:
                    for e in m.tok_sets[t, lay].tolist():
                        calls[e] = calls.get(e, 0) + 1
                work = np.zeros(n_nodes)
                for node in range(n_nodes):
                    for k in cl.hosts_of(node).tolist():
                        busy = sum((wl.expert_time_s + c * wl.expert_time_per_token_s) * hosts[k, lay, e]
                                   / count[node, lay, e] for e, c in calls.items() if serve[x, lay, e] == node)
                        work[node] = max(work[node], busy / cl.host_speed[k])
                rows = np.zeros(n_nodes)
                for t in tokens:
                    for e in m.tok_sets[t, lay].tolist():
                        if serve[x, lay, e] != x:
                            rows[serve[x, lay, e]] += 1
                trips = [m.rtt[x, s] + rows[s] * m.byte_time[x, s] + work[s] for s in np.flatnonzero(rows)]
                total += max([work[x], *trips])
        path = [h, *table[h].tolist(), h]
        out[h] = total / max(len(batches), 1) + sum(hop[h, a, b] for a, b in itertools.pairwise(path))
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 3), st.integers(1, 3), st.integers(3, 6), st.sampled_from([1, 2, 3]),
       st.integers(0, 2**32 - 1))
def test_the_row_view_equals_its_plain_definition(nodes: int, layers: int, experts: int, batch: int,
                                                  seed: int) -> None:
    """Random nodes of one or two GPUs of unequal speed, replicas anywhere (every expert held), random
    routes, batches of 1-3 rows, a per-token time: the vectorised row view equals the loops above."""
    rng = np.random.default_rng(seed)
    gpus = rng.integers(1, 3, size=nodes)
    host_node = np.repeat(np.arange(nodes), gpus)
    hosts = rng.random((host_node.size, layers, experts)) < 0.4
    anywhere = rng.integers(0, host_node.size, size=(layers, experts))  # every expert held somewhere
    hosts[anywhere, np.arange(layers)[:, None], np.arange(experts)] = True
    c = Cluster(host_node, hosts.sum(axis=(1, 2)), rng.uniform(0.5, 2.0, size=host_node.size),
                np.array(RTT_S), np.array(BPS))
    f = rng.gamma(0.5, size=(nodes, layers, experts)) * 100 + 1e-3
    wl = Workload.uniform(nodes, batch, top_k=2, bytes_per_token=ROW_BYTES, expert_time_s=EXPERT_S,
                          expert_time_per_token_s=EXPERT_S / 10)
    m = RouteModel(c, f, CoActivation.independent(f, 2, samples_per_node=6, seed=seed % 1000), wl)
    table = rng.integers(0, nodes, size=(nodes, layers))
    got = m.row_step_times(Placement(hosts).node_view(c), table, hosts)
    assert got == pytest.approx(_row_times_by_loops(m, hosts, table), rel=1e-9, abs=1e-12)
