"""Routes: the value and its checks, the pipeline split, the route DP, the route policy on the model,
the plan schema with routes, and the simulator's hops and local experts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.placement import Cluster, CoActivation, InvalidInputError, Placement, Workload, validate
from services.placement.errors import CapacityError
from services.placement.latency_model import LatencyModel
from services.placement.planner import ClusterView, from_plan_routes, to_plan_routes
from services.placement.policies import POLICIES
from services.placement.policies.pipeline import pipeline_split
from services.placement.route_model import RouteModel
from services.placement.routes import check_route, foreign_layers, hops, kv_slots, segments, stay_home
from shared.errors import BadRequest
from shared.schemas import Plan, parse_plan


@pytest.mark.parametrize(
    ("route", "message"),
    [([0, 1], "one node per layer (3)"), ([0, 3, 1], "0..2"), ([0, -1, 1], "0..2"), ([0, 1.5, 1], "integer"),
     ([0, float("nan"), 1], "integer"), (["a", "b", "c"], "integer")],
)
def test_bad_routes_are_refused(route: list, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_route(route, num_nodes=3, num_layers=3)


def test_route_values() -> None:
    assert check_route([2.0, 0, 0], 3, 3).tolist() == [2, 0, 0]
    assert segments([3, 3, 0, 0, 0, 3]) == [(0, 2, 3), (2, 5, 0), (5, 6, 3)]
    assert hops([3, 3, 0, 0, 0, 3], home=3) == 2
    assert hops([0, 0, 1, 2], home=1) == 4  # out to 0, to 1, to 2, back to 1
    assert hops([1, 1], home=1) == 0
    table = np.array([[0, 1, 1], [0, 1, 2], [2, 2, 2]])
    # node 0 runs layer 0 for home 1; node 1 layers 1-2 for home 0; node 2 layer 2 for home 1
    assert foreign_layers(table).tolist() == [1, 2, 1]
    assert kv_slots(table, 3, 1.5).tolist() == [2, 3, 2]


def test_placement_routes_checked_and_stay_home_is_none() -> None:
    hosts = np.ones((2, 3, 4), dtype=bool)
    assert Placement(hosts, routes=stay_home(2, 3)).routes is None
    p = Placement(hosts, routes=np.array([[0, 1, 1], [1, 1, 1]]))
    assert p.routes is not None
    assert p.routes.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert not p.equals(Placement(hosts))
    assert p.route_table(2).tolist() == [[0, 1, 1], [1, 1, 1]]
    with pytest.raises(InvalidInputError, match="one node per layer"):
        Placement(hosts, routes=np.array([[0, 1], [1, 1]]))
    with pytest.raises(InvalidInputError, match=r"node indices 0\.\.1"):
        Placement(hosts, routes=np.array([[0, 2, 1], [1, 1, 1]]))


def test_validate_counts_foreign_kv() -> None:
    """Node 1 runs 2 layers of home 0: at 1.5 slots of KV per layer it needs 3 more slots than experts."""
    c = Cluster.from_slots([8, 8])
    hosts = np.zeros((2, 2, 4), dtype=bool)
    hosts[0, 0], hosts[1, 1] = True, True
    routed = Placement(hosts, routes=np.array([[1, 1], [1, 1]]))
    validate(routed, c, 2, 4, kv_slots_per_layer=1.5)  # 4 experts + 3 KV slots <= 8
    with pytest.raises(CapacityError, match="foreign KV"):
        validate(routed, c, 2, 4, kv_slots_per_layer=2.5)


def test_pipeline_split_proportional_to_memory() -> None:
    """Slots 64, 64, 128 and 8 layers × 16 experts: ranges of 2, 2 and 4 layers, every expert of a range
    on its node, one shared route; foreign KV of 10 slots per layer shrinks node 0 and 1 to 1 layer."""
    view, owner = pipeline_split(np.array([64, 64, 128]), 8, 16)
    assert owner.tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    assert view.sum(axis=(1, 2)).tolist() == [32, 32, 64]
    for lay, n in enumerate(owner):
        assert view[n, lay].all()
    f = np.ones((3, 8, 16))
    p = POLICIES["pipeline"](f, Cluster.from_slots([64, 64, 128]))
    assert p.routes is not None
    assert all(row.tolist() == owner.tolist() for row in p.routes)
    # Slots 64, 64, 160 and 9 slots of KV per layer and foreign home: a layer takes 16 + 2·9 slots, so
    # whole ranges of 1, 1, 4 layers; the 2 left run on the nodes with the most room left, 0 and 1.
    c = Cluster.from_slots([64, 64, 160])
    _, owner_kv = pipeline_split(c.node_slots(), 8, 16, kv_slots_per_layer=9.0)
    assert owner_kv.tolist() == [0, 1, 2, 2, 2, 2, 0, 1]
    kv = POLICIES["pipeline"](f, c, workload=Workload.uniform(3, kv_slots_per_layer=9.0))
    validate(kv, c, 8, 16, kv_slots_per_layer=9.0)
    with pytest.raises(CapacityError):  # the split that ignores KV does not leave room for it
        validate(POLICIES["pipeline"](f, c), c, 8, 16, kv_slots_per_layer=9.0)


def test_pipeline_degrades_when_layers_do_not_fit() -> None:
    """Slots 10, 10, 12 for 2 layers × 16 experts: no node holds a whole layer, so each layer runs on the
    node with the most room left (node 2: no KV charged, so both) and the experts go expert-major over
    the nodes ∝ room: the executing node holds the largest share of each layer."""
    view, owner = pipeline_split(np.array([10, 10, 12]), 2, 16)
    assert owner.tolist() == [2, 2]
    for lay in range(2):
        assert view[2, lay].sum() == view[:, lay].sum(axis=1).max() > 0
    assert view.any(axis=0).all()
    assert np.all(view.sum(axis=(1, 2)) <= [10, 10, 12])


@pytest.mark.parametrize(
    ("slots", "shape", "routes"),
    [
        # 9 + 4 slots, 3 layers × 4 experts, 0.5 KV slots per layer and foreign home: node 0 runs layers 0-1
        # (8 experts + 1 slot of KV); layer 2 fits node 1 but its KV for home 0 would not: every home runs it
        ([9, 4], (3, 4), [[0, 0, 0], [0, 0, 1]]),
        # 12 + 0 slots, 2 layers × 6 experts: a whole layer's KV would leave 5 slots for the other 6 experts,
        # so no layer runs away from home (node 1 calls every expert on node 0): stay-home routes, None
        ([12, 0], (2, 6), None),
    ],
)
def test_pipeline_fits_its_foreign_kv_when_memory_is_tight(slots: list[int], shape: tuple[int, int],
                                                           routes: list | None) -> None:
    """Where the slots cannot hold the experts and the other homes' KV, the layers left over run at home
    (and whole ranges shrink): the plan always fits with its KV. It used to put the experts first, over
    the slots once the KV was counted."""
    c, f = Cluster.from_slots(slots), np.ones((2, *shape))
    wl = Workload.uniform(2, kv_slots_per_layer=0.5)
    p = POLICIES["pipeline"](f, c, workload=wl)
    validate(p, c, *shape, kv_slots_per_layer=0.5)
    assert (None if p.routes is None else p.routes.tolist()) == routes
    validate(POLICIES["route"](f, c, workload=wl), c, *shape, kv_slots_per_layer=0.5)
def _instance(rtt: float, slots: list[int], n_layers: int = 6, n_experts: int = 8, seed: int = 0
              ) -> tuple[np.ndarray, Cluster, CoActivation]:
    rng = np.random.default_rng(seed)
    f = rng.gamma(1.0, size=(len(slots), n_layers, n_experts)) * 100
    c = Cluster.from_slots(slots, rtt_s=rtt, bandwidth_Bps=62.5e6)
    return f, c, CoActivation.independent(f, 2, samples_per_node=64, seed=seed)


def test_route_model_is_the_latency_model_when_staying_home() -> None:
    f, c, coact = _instance(4e-3, [20, 20, 40])
    for batch in (1, 4):
        wl = Workload.uniform(3, batch, top_k=2, bytes_per_token=4096.0)
        p = POLICIES["prism"](f, c)
        assert RouteModel(c, f, coact, wl).cost(p) == pytest.approx(LatencyModel(c, f, coact, wl).cost(p), rel=1e-12)


def test_route_dp_stays_home_when_home_holds_everything() -> None:
    f, c, coact = _instance(4e-3, [48, 48, 48])
    wl = Workload.uniform(3, 1, top_k=2, bytes_per_token=4096.0)
    view = np.ones((3, 6, 8), dtype=bool)
    assert RouteModel(c, f, coact, wl).route_dp(view).tolist() == stay_home(3, 6).tolist()
    assert POLICIES["route"](f, c, coact=coact, workload=wl).routes is None


def test_route_dp_takes_the_pipeline_when_hops_are_cheap() -> None:
    """Each node holds two whole layers and nothing else; hops of 0.05 ms and 4 KB tokens: every home
    runs each layer where its experts are, in the pipeline's order."""
    f, c, coact = _instance(1e-4, [16, 16, 16])
    wl = Workload.uniform(3, 1, top_k=2, bytes_per_token=4096.0)
    view, owner = pipeline_split(c.node_slots(), 6, 8)
    routes = RouteModel(c, f, coact, wl).route_dp(view)
    assert routes.tolist() == [owner.tolist()] * 3


@pytest.mark.parametrize("model", ["deepseek-v2-lite", "mixtral-8x7b"])
@pytest.mark.parametrize("regime", ["rtt-b1", "rtt-b8", "bw-b1", "bw-b8"])
def test_route_never_worse_than_pipeline_or_staying_home_on_the_load_view(model: str, regime: str) -> None:
    """On the bundled testbed scenarios, on the load view `route` chooses by (each home's step alone with
    the dense part, plus the queueing the other homes add): never above its two baselines, the exact
    pipeline split and the `latency` placement; strictly below the pipeline on DeepSeek-V2-Lite where
    round trips dominate. Every policy's plan fits its slots with its foreign KV."""
    from services.placement import scenarios as sc

    s = sc.published_testbed(model, regime, requests_per_node=6)
    n = s.cluster.num_nodes
    f, coact = s.profile.counts(n), s.profile.coactivation(n)
    m = RouteModel(s.cluster, f, coact, s.workload)
    costs = {}
    for name, policy in POLICIES.items():
        p = policy(f, s.cluster, coact=coact, workload=s.workload)
        validate(p, s.cluster, f.shape[1], f.shape[2], s.workload.kv_slots_per_layer)
        costs[name] = m.load_cost(p)
    assert costs["route"] <= min(costs["pipeline"], costs["latency"]) * (1 + 1e-12), costs
    if model == "deepseek-v2-lite" and regime.startswith("rtt"):
        assert costs["route"] < costs["pipeline"], costs


def test_plan_schema_with_and_without_routes() -> None:
    old = {"epoch": 3, "model": "demo", "policy": "prism", "hosts": {"h0": [[0, 1], [1, 2]]}, "objective": 4.0}
    plan = parse_plan(json.dumps(old).encode())
    assert plan.routes is None
    assert json.loads(plan.encode()) == old  # an old reader sees the old shape
    initial = {"epoch": 1, "model": "demo", "policy": "initial", "hosts": {"h0": []}}
    assert json.loads(parse_plan(json.dumps(initial).encode()).encode()) == initial
    routed = {**old, "routes": {"a": ["a", "b", "b"], "b": ["b", "b", "b"]}}
    assert json.loads(parse_plan(json.dumps(routed).encode()).encode()) == routed
    for bad in ({**old, "routes": {"a": ["a", "b"], "b": ["b"]}}, {**old, "routes": {"a": ["a.b"]}},
                {**old, "epoch": -1}, {**old, "color": "red"}):
        with pytest.raises(BadRequest):
            parse_plan(json.dumps(bad).encode())
    assert Plan(epoch=1, model="m", policy="p", hosts={}).routes is None


def test_plan_routes_name_decoder_layers() -> None:
    """MoE layers 1 and 2 of a 4-layer model: dense layer 0 runs at home, dense layer 3 where layer 2 ran."""
    view = ClusterView(Cluster.from_slots([4, 4]), ["a", "b"], ["a-h0", "b-h0"])
    table = np.array([[1, 0], [1, 1]])
    named = to_plan_routes(table, view, [1, 2], 4)
    assert named == {"a": ["a", "b", "a", "a"], "b": ["b", "b", "b", "b"]}
    back = from_plan_routes(named, view, [1, 2])
    assert back is not None
    assert back.tolist() == table.tolist()
    assert to_plan_routes(None, view, [1, 2], 4) is None
    assert from_plan_routes({"a": ["a", "c", "a", "a"]}, view, [1, 2]) is None  # a node not in the view
