"""Routes in the simulator (hops one way, foreign KV, each layer from where it runs) and in the CLIs
(`prism place --policy route --json`, `prism sim` rows for pipeline and route)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cli.main import build_parser
from services.placement.simulator import SimConfig, simulate
from services.placement.traces import RoutingTrace, TraceMeta
from services.placement.types import Cluster, Placement

MS = 1e-3
# hidden 100 × 2 bytes = 200 bytes per token; at 1e6 B/s 0.2 ms per token one way
CFG = SimConfig(max_batch=4, dense_time_s=0.1 * MS, dense_time_per_token_s=0.0, expert_time_s=0.05 * MS,
                expert_time_per_token_s=0.0, envelope_bytes=0, kv_bytes_per_token_layer=10.0)


def _one_token(experts: list[list[int]]) -> RoutingTrace:
    """One request of one token at node 0; experts [L][K]."""
    x = np.array([experts])
    meta = TraceMeta(model="hand", moe_layers=tuple(range(x.shape[1])), num_experts=2, top_k=x.shape[2],
                     hidden_size=100, domains=("d",), nodes=("n0", "n1"))
    return RoutingTrace(experts=x, weights=np.ones(x.shape), node=np.zeros(1, dtype=int), domain=np.zeros(1, dtype=int),
                        request=np.zeros(1, dtype=int), position=np.zeros(1, dtype=int), meta=meta)


def test_a_routed_step_by_hand() -> None:
    """Node 0 holds layer 0, node 1 layer 1. Home 0 on route [0, 1]: layer 0 at home (dense 0.1 + expert
    0.05), hop to 1 (0.2 bytes + 1.0 half rtt), layer 1 there (0.15), hop back (1.2): 2.7 ms, no expert
    message; node 1 held the request's KV for one position of one layer."""
    cluster = Cluster.from_slots([2, 2], rtt_s=2 * MS, bandwidth_Bps=1e6)
    hosts = np.array([[[True, True], [False, False]], [[False, False], [True, True]]])
    routed = Placement(hosts, routes=np.array([[0, 1], [1, 1]]))
    r = simulate(_one_token([[0], [0]]), cluster, routed, CFG, arrivals=[np.array([0.0]), np.zeros(0)])
    assert r.latencies_s[0] == pytest.approx(2.7 * MS)
    assert (r.hops, r.messages, r.remote_calls, r.local_calls) == (2, 0, 0, 2)
    assert r.bytes_across == 400
    assert r.foreign_kv_peak_bytes.tolist() == [0.0, 10.0]
    # the same placement staying home: layer 1 is a round trip from node 0 (0.1 + 0.2 + 1 + 0.05 + 0.2 + 1)
    home = simulate(_one_token([[0], [0]]), cluster, Placement(hosts), CFG, arrivals=[np.array([0.0]), np.zeros(0)])
    assert home.latencies_s[0] == pytest.approx(0.15 * MS + 2.55 * MS)
    assert (home.hops, home.messages) == (0, 1)
    assert home.foreign_kv_peak_bytes.tolist() == [0.0, 0.0]
    # a message's software time: once per hop (two here), twice per round trip (one here)
    slow = replace(CFG, message_time_s=0.3 * MS)
    assert simulate(_one_token([[0], [0]]), cluster, routed, slow, arrivals=[np.array([0.0]), np.zeros(0)]
                    ).latencies_s[0] == pytest.approx((2.7 + 2 * 0.3) * MS)
    assert simulate(_one_token([[0], [0]]), cluster, Placement(hosts), slow, arrivals=[np.array([0.0]), np.zeros(0)]
                    ).latencies_s[0] == pytest.approx((2.7 + 2 * 0.3) * MS)
    # a segment's fixed work: once, on node 1 as it takes the segment in (not on the way home, not staying home)
    seg = replace(CFG, segment_time_s=0.4 * MS)
    assert simulate(_one_token([[0], [0]]), cluster, routed, seg, arrivals=[np.array([0.0]), np.zeros(0)]
                    ).latencies_s[0] == pytest.approx((2.7 + 0.4) * MS)
    assert simulate(_one_token([[0], [0]]), cluster, Placement(hosts), seg, arrivals=[np.array([0.0]), np.zeros(0)]
                    ).latencies_s[0] == pytest.approx(2.7 * MS)


def _two_homes(experts: list[list[int]]) -> RoutingTrace:
    """Two one-token requests, one at node 0 and one at node 1, both choosing experts [L][K]."""
    x = np.array([experts, experts])
    meta = TraceMeta(model="hand", moe_layers=tuple(range(x.shape[1])), num_experts=2, top_k=x.shape[2],
                     hidden_size=100, domains=("d",), nodes=("n0", "n1", "n2"))
    return RoutingTrace(experts=x, weights=np.ones(x.shape), node=np.array([0, 1]), domain=np.zeros(2, dtype=int),
                        request=np.array([0, 1]), position=np.zeros(2, dtype=int), meta=meta)


def test_a_node_runs_other_homes_segments_as_a_gating_does() -> None:
    """Homes 0 and 1 run both layers on node 2 (which holds everything). Their segments reach it together
    (1.2 ms: half the round trip and 200 bytes) and run as one batch, as the gating's segment server runs
    the waiting segments of one layer range: per layer one dense part and one group for their shared
    expert (0.15 ms), so both are home at 1.2 + 0.3 + 1.2 = 2.7 ms, and node 2 computed 0.3 ms in all. A
    segment that arrives while a batch runs waits for it: home 1's request 0.1 ms later reaches node 2 at
    1.3, runs 1.5-1.8 and is home at 3.0."""
    cluster = Cluster.from_slots([2, 2, 4], rtt_s=2 * MS, bandwidth_Bps=1e6)
    hosts = np.zeros((3, 2, 2), dtype=bool)
    hosts[2] = True
    routed = Placement(hosts, routes=np.array([[2, 2], [2, 2], [2, 2]]))
    together = simulate(_two_homes([[0], [0]]), cluster, routed, CFG, arrivals=[np.zeros(1), np.zeros(1), np.zeros(0)])
    assert together.latencies_s.tolist() == pytest.approx([2.7 * MS, 2.7 * MS])
    assert together.compute_s == pytest.approx(0.3 * MS)
    assert together.host_compute_s.tolist() == pytest.approx([0.0, 0.0, 0.3 * MS])  # all of it on node 2
    assert (together.hops, together.local_calls) == (4, 4)  # (token, expert) calls: 2 tokens × 2 layers
    later = simulate(_two_homes([[0], [0]]), cluster, routed, CFG,
                     arrivals=[np.zeros(1), np.array([0.1 * MS]), np.zeros(0)])
    assert later.latencies_s.tolist() == pytest.approx([2.7 * MS, 2.9 * MS])
    assert later.compute_s == pytest.approx(0.6 * MS)


def test_a_remote_layer_calls_from_where_it_runs() -> None:
    """Route [1, 1] for home 0 while node 1 lacks expert 1 of layer 1: the call goes from node 1 to
    node 0 (a round trip from the executing node, not from home)."""
    cluster = Cluster.from_slots([3, 3], rtt_s=2 * MS, bandwidth_Bps=1e6)
    hosts = np.array([[[True, True], [False, True]], [[True, True], [True, False]]])
    routed = Placement(hosts, routes=np.array([[1, 1], [1, 1]]))
    r = simulate(_one_token([[0], [1]]), cluster, routed, CFG, arrivals=[np.array([0.0]), np.zeros(0)])
    # hop 1.2, layer 0 0.15, layer 1: dense 0.1 + round trip 2.4 + expert 0.05, hop back 1.2
    assert r.latencies_s[0] == pytest.approx((1.2 + 0.15 + 2.55 + 1.2) * MS)
    assert (r.hops, r.messages, r.remote_calls) == (2, 1, 1)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    args = build_parser().parse_args(list(argv))
    code = args.func(args)
    return code, capsys.readouterr().out


def test_place_route_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Routes next to the placement: every home, one executing node per layer, and a layer runs only
    where the placement puts all its experts or calls the rest; stay-home policies print stay-home."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "f.npy", rng.gamma(1.0, size=(3, 6, 8)) * 100)
    code, out = _run(capsys, "place", "--counts", str(tmp_path / "f.npy"), "--slots", "20,20,40",
                     "--policy", "route", "--json", "--top-k", "2")
    assert code == 0
    got = json.loads(out)
    assert set(got) >= {"placement", "routes", "host_placement"}
    assert sorted(got["routes"]) == ["0", "1", "2"]
    assert all(len(r) == 6 and all(0 <= x < 3 for x in r) for r in got["routes"].values())
    assert any(r != [int(h)] * 6 for h, r in got["routes"].items()), "with 4 ms round trips some home leaves"
    code, out = _run(capsys, "place", "--counts", str(tmp_path / "f.npy"), "--slots", "20,20,40",
                     "--policy", "eplb", "--json")
    assert json.loads(out)["routes"] == {str(h): [h] * 6 for h in range(3)}


def test_sim_has_pipeline_and_route_rows(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(capsys, "sim", "--scenario", "testbed-mixtral", "--regime", "rtt-b1", "--requests", "8",
                     "--policies", "latency,pipeline,route", "--json")
    assert code == 0
    runs = {r["policy"]: r for r in json.loads(out)["scenarios"][0]["runs"]}
    assert set(runs) == {"latency", "pipeline", "route"}
    assert runs["latency"]["hops"] == 0 < runs["pipeline"]["hops"]
    assert runs["route"]["mean_latency_s"] <= min(runs["latency"]["mean_latency_s"], runs["pipeline"]["mean_latency_s"])


def test_place_route_takes_the_load_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`--dense-time-us`, `--step-rate` and `--tokens-per-request` reach the route policy's load view (a
    rehearsal); a negative rate and a request of no tokens are refused."""
    rng = np.random.default_rng(1)
    np.save(tmp_path / "f.npy", rng.gamma(1.0, size=(3, 6, 8)) * 100)
    base = ("place", "--counts", str(tmp_path / "f.npy"), "--slots", "20,20,40", "--policy", "route", "--json",
            "--top-k", "2")
    code, out = _run(capsys, *base, "--dense-time-us", "200", "--step-rate", "50", "--tokens-per-request", "16")
    assert code == 0
    assert sorted(json.loads(out)["routes"]) == ["0", "1", "2"]
    for flag, value, field in (("--step-rate", "-1", "step_rate"), ("--tokens-per-request", "0", "tokens_per_request")):
        args = build_parser().parse_args([*base, flag, value])
        assert args.func(args) == 2
        assert field in capsys.readouterr().err


def test_hosts_on_one_machine_take_turns_on_its_cores() -> None:
    """Two homes, each a token whose one layer's expert its own host holds, arriving together: 0.15 ms
    each (dense 0.1 + expert 0.05). On two cores (or each host its own) both end at 0.15; on one core the
    simulator books node 0's layer first (dense, then expert: 0.15) and node 1's after it on that core:
    it ends at 0.3 ms."""
    x = np.array([[[0]], [[0]]])
    meta = TraceMeta(model="hand", moe_layers=(0,), num_experts=1, top_k=1, hidden_size=100, domains=("d",),
                     nodes=("n0", "n1"))
    trace = RoutingTrace(experts=x, weights=np.ones(x.shape), node=np.array([0, 1]), domain=np.zeros(2, dtype=int),
                         request=np.array([0, 1]), position=np.zeros(2, dtype=int), meta=meta)
    cluster = Cluster.from_slots([1, 1], rtt_s=2 * MS, bandwidth_Bps=1e6)
    both = Placement(np.ones((2, 1, 1), dtype=bool))
    arrivals = [np.array([0.0]), np.array([0.0])]
    for cores in (0, 2):
        r = simulate(trace, cluster, both, replace(CFG, machine_cores=cores), arrivals=arrivals)
        assert sorted(r.latencies_s) == pytest.approx([0.15 * MS, 0.15 * MS])
    one = simulate(trace, cluster, both, replace(CFG, machine_cores=1), arrivals=arrivals)
    assert sorted(one.latencies_s) == pytest.approx([0.15 * MS, 0.3 * MS])


def test_a_nodes_hosts_on_one_thread_take_turns() -> None:
    """One node, two hosts each holding one of the two experts a token chooses: the dense part on the first
    host (0.1 ms), then each host its expert (0.05). Each host on its own: both experts at once, 0.15 ms;
    on the node's one thread (a CPU gating's embedded hosts) one after the other, 0.2 ms."""
    x = np.array([[[0, 1]]])
    meta = TraceMeta(model="hand", moe_layers=(0,), num_experts=2, top_k=2, hidden_size=100, domains=("d",),
                     nodes=("n0",))
    trace = RoutingTrace(experts=x, weights=np.ones(x.shape), node=np.zeros(1, dtype=int),
                         domain=np.zeros(1, dtype=int), request=np.zeros(1, dtype=int),
                         position=np.zeros(1, dtype=int), meta=meta)
    cluster = Cluster(host_node=np.array([0, 0]), host_slots=np.array([1, 1]), host_speed=np.ones(2),
                      rtt_s=np.zeros((1, 1)), bandwidth_Bps=np.full((1, 1), np.inf))
    split = Placement(np.array([[[True, False]], [[False, True]]]))
    arrivals = [np.array([0.0])]
    apart = simulate(trace, cluster, split, CFG, arrivals=arrivals)
    assert apart.latencies_s[0] == pytest.approx(0.15 * MS)
    together = simulate(trace, cluster, split, replace(CFG, one_thread_per_node=True), arrivals=arrivals)
    assert together.latencies_s[0] == pytest.approx(0.2 * MS)
    assert together.local_calls == apart.local_calls == 2


def test_a_messages_cpu_is_booked_at_both_ends() -> None:
    """Stay-home, the token's layer-1 expert on node 1 (the by-hand case above): a message's CPU of 0.1 ms
    adds 0.05 at the caller before sending, 0.1 at the host and 0.05 after the reply: 0.2 ms of latency
    for its one round trip; the compute booked is the same with or without it. A routed step's hops pay
    it as the one-way messages they are."""
    cluster = Cluster.from_slots([2, 2], rtt_s=2 * MS, bandwidth_Bps=1e6)
    hosts = np.array([[[True, True], [False, False]], [[False, False], [True, True]]])
    arrivals = [np.array([0.0]), np.zeros(0)]
    plain = simulate(_one_token([[0], [0]]), cluster, Placement(hosts), CFG, arrivals=arrivals)
    costly = simulate(_one_token([[0], [0]]), cluster, Placement(hosts), replace(CFG, message_cpu_s=0.1 * MS),
                      arrivals=arrivals)
    assert costly.latencies_s[0] == pytest.approx(plain.latencies_s[0] + 0.2 * MS)
    assert costly.round_trips == plain.round_trips == 1
    assert costly.compute_s == pytest.approx(plain.compute_s) == pytest.approx((2 * 0.1 + 2 * 0.05) * MS)
    # routed instead: two hops (out and home), each a message one way, 0.05 ms at each end: 0.2 ms in all
    routed = Placement(hosts, routes=np.array([[0, 1], [1, 1]]))
    hop_plain = simulate(_one_token([[0], [0]]), cluster, routed, CFG, arrivals=arrivals)
    hop_costly = simulate(_one_token([[0], [0]]), cluster, routed, replace(CFG, message_cpu_s=0.1 * MS),
                          arrivals=arrivals)
    assert hop_costly.latencies_s[0] == pytest.approx(hop_plain.latencies_s[0] + 0.2 * MS)
    assert hop_costly.hops == hop_plain.hops == 2
    assert hop_costly.compute_s == pytest.approx(hop_plain.compute_s)


def test_a_prompt_runs_as_one_step() -> None:
    """A request of 3 tokens whose first 2 are its prompt: 2 steps, not 3. Stay-home, every expert at
    home: the prefill step books one dense part and one call per expert of its 2 tokens (0.1 + 2 × 0.05,
    the two tokens choosing different experts), then one decode step (0.15): 0.35 ms in all; it counts
    2 generated tokens. Without `prefill` it is 3 steps of 0.15 ms."""
    x = np.array([[[0]], [[1]], [[0]]])
    meta = TraceMeta(model="hand", moe_layers=(0,), num_experts=2, top_k=1, hidden_size=100, domains=("d",),
                     nodes=("n0",))
    trace = RoutingTrace(experts=x, weights=np.ones(x.shape), node=np.zeros(3, dtype=int),
                         domain=np.zeros(3, dtype=int), request=np.zeros(3, dtype=int), position=np.arange(3),
                         meta=meta)
    cluster = Cluster.from_slots([2], rtt_s=2 * MS, bandwidth_Bps=1e6)
    home = Placement(np.ones((1, 1, 2), dtype=bool))
    r = simulate(trace, cluster, home, CFG, arrivals=[np.array([0.0])], prefill=np.array([2]))
    assert r.latencies_s[0] == pytest.approx(0.35 * MS)
    assert (r.steps, r.tokens) == (2, 2)
    plain = simulate(trace, cluster, home, CFG, arrivals=[np.array([0.0])])
    assert plain.latencies_s[0] == pytest.approx(0.45 * MS)
    assert (plain.steps, plain.tokens) == (3, 3)
