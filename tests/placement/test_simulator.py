"""Simulator: hand-worked latencies, queueing on links and hosts, batching, invariants, migration."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from services.placement.errors import InvalidInputError
from services.placement.policies import get_policy
from services.placement.simulator import SimConfig, Timeline, serving_nodes, simulate
from services.placement.traces import RoutingTrace, TraceMeta
from services.placement.types import Cluster, Placement, proxy_objective

MS = 1e-3
# hidden 100 × 2 bytes = 200 bytes per token; at 1e6 B/s that is 0.2 ms per token one way.
CFG = SimConfig(max_batch=4, dense_time_s=0.1 * MS, dense_time_per_token_s=0.0, expert_time_s=0.05 * MS,
                expert_time_per_token_s=0.0, envelope_bytes=0)


def _trace(experts: list[list[list[int]]], node: list[int], request: list[int], num_experts: int = 2,
           num_nodes: int = 2) -> RoutingTrace:
    """experts [T][L][K]; positions count up inside each request."""
    x = np.array(experts)
    pos = np.zeros(len(request), dtype=int)
    for i in range(1, len(request)):
        pos[i] = pos[i - 1] + 1 if request[i] == request[i - 1] else 0
    meta = TraceMeta(model="hand", moe_layers=tuple(range(x.shape[1])), num_experts=num_experts,
                     top_k=x.shape[2], hidden_size=100, domains=("d",), nodes=tuple(f"n{i}" for i in range(num_nodes)))
    return RoutingTrace(experts=x, weights=np.ones(x.shape), node=np.array(node), domain=np.zeros(len(node), dtype=int),
                        request=np.array(request), position=pos, meta=meta)


def _two_nodes(rtt: float = 2 * MS) -> tuple[Cluster, Placement]:
    cluster = Cluster.from_slots([1, 1], rtt_s=rtt, bandwidth_Bps=1e6)
    # one layer, 2 experts: node 0 holds expert 0, node 1 holds expert 1
    return cluster, Placement(np.array([[[True, False]], [[False, True]]]))


def test_one_remote_token_by_hand() -> None:
    cluster, placement = _two_nodes()
    r = simulate(_trace([[[1]]], [0], [0]), cluster, placement, CFG, arrivals=[np.array([0.5]), np.zeros(0)])
    # dense 0.1 + send 0.2 + half rtt 1.0 + expert 0.05 + reply 0.2 + half rtt 1.0 = 2.55 ms
    assert r.latencies_s[0] == pytest.approx(2.55 * MS)
    assert (r.remote_calls, r.local_calls, r.messages) == (1, 0, 1)
    assert r.bytes_across == 400


def test_a_messages_software_time_is_paid_each_way_and_not_by_local_calls() -> None:
    cluster, placement = _two_nodes()
    cfg = replace(CFG, message_time_s=0.3 * MS)
    remote = simulate(_trace([[[1]]], [0], [0]), cluster, placement, cfg, arrivals=[np.array([0.5]), np.zeros(0)])
    assert remote.latencies_s[0] == pytest.approx((2.55 + 2 * 0.3) * MS)  # by hand above, plus 0.3 there and back
    local = simulate(_trace([[[0]]], [0], [0]), cluster, placement, cfg, arrivals=[np.array([0.0]), np.zeros(0)])
    assert local.latencies_s[0] == pytest.approx(0.15 * MS)


def test_one_local_token_by_hand() -> None:
    cluster, placement = _two_nodes()
    r = simulate(_trace([[[0]]], [0], [0]), cluster, placement, CFG, arrivals=[np.array([0.0]), np.zeros(0)])
    assert r.latencies_s[0] == pytest.approx(0.15 * MS)           # dense 0.1 + expert 0.05
    assert (r.remote_calls, r.local_calls, r.bytes_across) == (0, 1, 0)


def test_two_layers_wait_for_the_slowest_group() -> None:
    """Top-2 with one local and one remote expert: each layer waits for the remote one."""
    cluster = Cluster.from_slots([2, 2], rtt_s=2 * MS, bandwidth_Bps=1e6)
    placement = Placement(np.array([[[True, False]] * 2, [[False, True]] * 2]))
    r = simulate(_trace([[[0, 1], [1, 0]]], [0], [0]), cluster, placement, CFG,
                 arrivals=[np.array([0.0]), np.zeros(0)])
    assert r.latencies_s[0] == pytest.approx(2 * 2.55 * MS)
    assert (r.remote_calls, r.local_calls, r.messages) == (2, 2, 2)


def test_link_and_host_queueing() -> None:
    """Nodes 0 and 1 both call expert 1 on node 2 at t=0: the host serves them one after the other,
    and each link is used once, so the second waits only for the host (0.05 ms)."""
    cluster = Cluster.from_slots([1, 1, 2], rtt_s=2 * MS, bandwidth_Bps=1e6)
    placement = Placement(np.array([[[True, False]], [[True, False]], [[True, True]]]))
    t = _trace([[[1]], [[1]]], [0, 1], [0, 1], num_nodes=3)
    r = simulate(t, cluster, placement, CFG, arrivals=[np.zeros(1), np.zeros(1), np.zeros(0)])
    assert sorted(r.latencies_s) == pytest.approx([2.55 * MS, 2.60 * MS])
    # Two tokens of ONE node to the same remote expert: one message of 400 bytes (0.4 ms each way).
    t2 = _trace([[[1]], [[1]]], [0, 0], [0, 1], num_nodes=3)
    r2 = simulate(t2, cluster, placement, CFG, arrivals=[np.zeros(2), np.zeros(0), np.zeros(0)])
    assert r2.latencies_s == pytest.approx([2.95 * MS, 2.95 * MS])
    assert (r2.messages, r2.remote_calls, r2.bytes_across) == (1, 2, 800)


def test_continuous_batching() -> None:
    """max_batch 2, three 2-token requests at t=0: the third joins when the first two finish."""
    cluster, placement = _two_nodes()
    cfg = SimConfig(max_batch=2, dense_time_s=0.1 * MS, dense_time_per_token_s=0.0, expert_time_s=0.05 * MS,
                    expert_time_per_token_s=0.0, envelope_bytes=0)
    t = _trace([[[0]]] * 6, [0] * 6, [0, 0, 1, 1, 2, 2])
    r = simulate(t, cluster, placement, cfg, arrivals=[np.zeros(3), np.zeros(0)])
    # steps of 0.15 ms (dense + one local group): requests 0, 1 end at 0.30 ms, request 2 at 0.60 ms
    assert sorted(r.latencies_s) == pytest.approx([0.30 * MS, 0.30 * MS, 0.60 * MS])
    assert r.steps == 4
    assert r.tokens == 6


def test_timeline_backfills_and_merges() -> None:
    tl = Timeline()
    assert tl.book(1.0, 1.0, 0.0) == 2.0
    assert tl.book(0.0, 0.5, 0.0) == 0.5           # fits in the gap before
    assert tl.book(0.2, 0.6, 0.0) == 2.6           # the gap 0.5-1.0 is too short: after 2.0
    assert tl.book(2.6, 1.0, 0.0) == 3.6           # touching: merged
    assert tl.busy == [(0.0, 0.5), (1.0, 3.6)]
    assert tl.book(0.3, 0.5, 0.0) == 1.0           # exactly fills the gap: one interval left
    assert tl.busy == [(0.0, 3.6)]
    assert tl.book(5.0, 1.0, 3.7) == 6.0           # old intervals dropped once `now` passed them
    assert tl.busy == [(5.0, 6.0)]


def test_nearest_replica_serves() -> None:
    rtt = np.array([[0, 1, 5], [1, 0, 1], [5, 1, 0]]) * MS
    cluster = Cluster.from_slots([1, 1, 1], rtt_s=rtt, bandwidth_Bps=1e6)
    view = np.array([[[True, False, False]], [[False, True, False]], [[False, True, True]]])
    serve = serving_nodes(view, cluster)
    np.testing.assert_array_equal(serve[0, 0], [0, 1, 2])     # expert 1: node 1 (1 ms) before node 2 (5 ms)
    np.testing.assert_array_equal(serve[2, 0], [0, 2, 2])
    # equal links: the next node after the requester, cyclically
    flat = Cluster.from_slots([1, 1, 1], rtt_s=MS, bandwidth_Bps=1e6)
    only_12 = np.array([[[True, False]], [[True, True]], [[True, True]]])
    np.testing.assert_array_equal(serving_nodes(only_12, flat)[0, 0], [0, 1])
    only_02 = np.array([[[True, True]], [[True, False]], [[True, True]]])
    np.testing.assert_array_equal(serving_nodes(only_02, flat)[1, 0], [1, 2])


def _small_instance(seed: int = 0) -> tuple[RoutingTrace, Cluster]:
    from services.placement.synthetic import PRESETS, Traffic, generate

    t = generate(PRESETS["mixtral-8x7b"], Traffic.dedicated(3, 3, 12, tokens_per_request=(4, 12)), seed=seed)
    cluster = Cluster(host_node=np.array([0, 1, 2, 2]), host_slots=np.full(4, 90), host_speed=np.ones(4),
                      rtt_s=np.array(2 * MS), bandwidth_Bps=np.array(62.5e6))
    return t, cluster


@pytest.mark.parametrize("policy", ["uniform", "optimal"])
def test_remote_calls_equal_the_proxy_on_the_simulated_trace(policy: str) -> None:
    t, cluster = _small_instance()
    placement = get_policy(policy)(t.counts(3), cluster)
    r = simulate(t, cluster, placement, SimConfig(arrival_rate=20.0, max_batch=4))
    assert r.remote_calls == proxy_objective(t.counts(3), placement, cluster)
    assert r.local_calls + r.remote_calls == t.num_tokens * t.num_layers * t.top_k
    assert r.tokens == t.num_tokens
    assert r.requests == len(np.unique(t.request))
    assert np.all(r.latencies_s > 0)


def test_seeded_and_better_placement_is_faster() -> None:
    t, cluster = _small_instance(1)
    cfg = SimConfig(arrival_rate=5.0, max_batch=4, seed=3)
    uni = get_policy("uniform")(t.counts(3), cluster)
    opt = get_policy("optimal")(t.counts(3), cluster)
    a, b = simulate(t, cluster, uni, cfg), simulate(t, cluster, uni, cfg)
    np.testing.assert_array_equal(a.latencies_s, b.latencies_s)
    c = simulate(t, cluster, opt, cfg)
    assert c.remote_calls < a.remote_calls
    assert c.mean_latency_s < a.mean_latency_s


def test_migration_takes_time_then_serves() -> None:
    """A controller that moves expert 1 to node 0 after the first step: calls turn local only once
    the weights (1 MB at half of 1e6 B/s = 2 s) have arrived."""
    cluster, placement = _two_nodes()
    both = Placement(np.array([[[True, True]], [[False, True]]]))
    cfg = SimConfig(max_batch=1, dense_time_s=0.1 * MS, dense_time_per_token_s=0.0, expert_time_s=0.05 * MS,
                    expert_time_per_token_s=0.0, envelope_bytes=0, expert_bytes=1_000_000)
    fired: list[float] = []

    def controller(node: int, experts: np.ndarray, now: float, current: Placement
                   ) -> tuple[Placement, np.ndarray] | None:
        if fired:
            return None
        fired.append(now)
        return both, np.array([1, 0])

    t = _trace([[[1]]] * 3, [0] * 3, [0, 1, 2])
    r = simulate(t, cluster, placement, cfg, controller=controller,
                 arrivals=[np.array([0.0, 1.0, 3.0]), np.zeros(0)])
    assert r.migrations == 1
    # request 1 (t = 1 s) still remote, and its link runs at half speed (send 0.4 ms, reply 0.2 ms)
    assert r.latencies_s == pytest.approx([2.55 * MS, 2.75 * MS, 0.15 * MS])
    assert (r.remote_calls, r.local_calls) == (2, 1)


def test_bad_arrivals() -> None:
    cluster, placement = _two_nodes()
    with pytest.raises(InvalidInputError, match="ascending arrivals"):
        simulate(_trace([[[1]]], [0], [0]), cluster, placement, CFG, arrivals=[np.zeros(2), np.zeros(0)])
    with pytest.raises(InvalidInputError):
        SimConfig(max_batch=0)


def test_replicas_to_load_and_migration_time() -> None:
    from services.placement.replan import migration_time, replicas_to_load

    cluster, placement = _two_nodes()
    both = Placement(np.array([[[True, True]], [[True, True]]]))
    loads = replicas_to_load(both, placement, cluster)
    np.testing.assert_array_equal(loads, [1, 1])
    # 1 MB over half of a 1e6 B/s link: 2 s; from local storage at 1e7 B/s: 0.1 s
    assert migration_time(loads, cluster, 1e6, 0.5) == pytest.approx(2.0)
    assert migration_time(loads, cluster, 1e6, 0.5, local_load_bytes_per_s=1e7) == pytest.approx(0.1)
    assert migration_time(np.zeros(2), cluster, 1e6, 0.5) == 0.0


def test_pure_modules_do_not_import_nats() -> None:
    import subprocess
    import sys

    mods = "traces, synthetic, calibration, stats, simulator, scenarios, replan, evaluate"
    code = f"import sys; from services.placement import {mods}; sys.exit('nats' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
