"""The latency cost model worked by hand, and the `latency` policy against the others on it."""

from __future__ import annotations

import numpy as np
import pytest

from services.placement import Cluster, CoActivation, InvalidInputError, Placement, Workload, validate
from services.placement.latency_model import expected_latency
from services.placement.policies import POLICIES

# 2 nodes, 1 layer, 2 experts, top-1. Node 0 chose expert 0 three times and expert 1 once; node 1
# chose expert 1 four times. Node 0 holds expert 0, node 1 expert 1.
F = np.array([[[3.0, 1.0]], [[0.0, 4.0]]])
SETS = np.array([[[[0]], [[0]], [[0]], [[1]]], [[[1]], [[1]], [[1]], [[1]]]])  # [N=2, S=4, L=1, K=1]
COACT = CoActivation(tokens=np.array([[4.0], [4.0]]), sets=SETS)
CLUSTER = Cluster.from_slots([1, 1], rtt_s=0.01, bandwidth_Bps=1e6)
SPLIT = Placement(np.array([[[True, False]], [[False, True]]]))


def test_expected_latency_batch_1_by_hand() -> None:
    """Bytes 1000 → 2·1000/1e6 = 2 ms there and back; 1 ms per (token, expert) call, nothing per
    active expert. Calls per token: node 0
    (0.75, 0.25), node 1 (0, 1). Work per step: node 0 serves 0.75 calls → 0.75 ms, node 1 serves
    0.25 + 1 → 1.25 ms. Node 0's tokens: 3 local (0.75 ms each), 1 remote: 10 + 2 + 1.25 = 13.25 ms →
    mean 3.875 ms. Node 1: all local, 1.25 ms. Equal token weights → 2.5625 ms."""
    wl = Workload.uniform(2, 1, bytes_per_token=1000.0, expert_time_s=0.0, expert_time_per_token_s=1e-3)
    assert expected_latency(SPLIT, CLUSTER, F, COACT, wl) == pytest.approx(2.5625e-3)


def test_expected_latency_batch_2_by_hand() -> None:
    """Batch 2: node 0's sample makes batches (0, 0) and (0, 1). Work doubles: node 0 1.5 ms, node 1
    2.5 ms. Batch (0, 0): local only, 1.5 ms; batch (0, 1): one token to node 1, 10 + 2 + 2.5 =
    14.5 ms → mean 8 ms. Node 1: 2.5 ms. Mean over nodes: 5.25 ms."""
    wl = Workload.uniform(2, 2, bytes_per_token=1000.0, expert_time_s=0.0, expert_time_per_token_s=1e-3)
    assert expected_latency(SPLIT, CLUSTER, F, COACT, wl) == pytest.approx(5.25e-3)


def test_one_message_per_remote_node_and_token() -> None:
    """Top-2 tokens whose two experts both live on node 1: node 0 pays ONE round trip (10 ms) and,
    with one message per node, sends the token once (2·1000 B / 1e6 B/s = 2 ms): 12 ms; with one
    request per expert the bytes double: 14 ms. Node 1 pays nothing (compute free); mean of the two."""
    f = np.array([[[1.0, 1.0]], [[1.0, 1.0]]])
    sets = np.array([[[[0, 1]]], [[[0, 1]]]])
    coact = CoActivation(tokens=np.array([[1.0], [1.0]]), sets=sets)
    c = Cluster.from_slots([0, 2], rtt_s=0.01, bandwidth_Bps=1e6)
    p = Placement(np.array([[[False, False]], [[True, True]]]))
    per_node = Workload.uniform(2, 1, bytes_per_token=1000.0, expert_time_s=0.0, per_expert_messages=False)
    assert expected_latency(p, c, f, coact, per_node) == pytest.approx(0.006)
    per_expert = Workload.uniform(2, 1, bytes_per_token=1000.0, expert_time_s=0.0, per_expert_messages=True)
    assert expected_latency(p, c, f, coact, per_expert) == pytest.approx(0.007)


def test_active_expert_costs_once_per_step() -> None:
    """One node, one layer, two experts, top-1, tokens 4 with counts (4 ln 2, 4 - 4 ln 2): λ = (ln 2,
    1 - ln 2) calls per step, so the experts are active with probability 1 - e^-λ = (1/2, 1 - 2/e);
    at 1 ms per active expert the step computes 1.5 - 2/e ms."""
    f = np.array([[[4 * np.log(2), 4 - 4 * np.log(2)]]])
    coact = CoActivation(tokens=np.array([[4.0]]), sets=np.array([[[[0]], [[1]]]]))
    c = Cluster.from_slots([2])
    p = Placement(np.ones((1, 1, 2), dtype=bool))
    wl = Workload.uniform(1, 1, expert_time_s=1e-3)
    assert expected_latency(p, c, f, coact, wl) == pytest.approx((1.5 - 2 / np.e) * 1e-3)


def _instance(seed: int, rtt: float, rate: float) -> tuple[np.ndarray, Cluster, CoActivation]:
    """3 nodes (1, 1 and 2 hosts), 6 layers × 16 experts, top-4, per-node skew, slots ~30%/host."""
    rng = np.random.default_rng(seed)
    n, n_layers, n_experts, k = 3, 6, 16, 4
    shared = rng.gamma(0.6, size=(n_layers, n_experts))
    f = np.stack([rng.poisson(400 * (shared + rng.gamma(0.6, size=(n_layers, n_experts))) / n_experts)
                  for _ in range(n)]).astype(float)
    slots = int(0.3 * n_layers * n_experts)
    c = Cluster(np.array([0, 1, 2, 2]), np.full(4, slots), np.ones(4), np.array(rtt), np.array(rate))
    return f, c, CoActivation.independent(f, k, samples_per_node=64, seed=seed)


@pytest.mark.parametrize(
    ("rtt", "rate", "batch"),
    [(4e-3, 62.5e6, 1), (4e-3, 62.5e6, 8), (2e-4, 62.5e6, 8), (2e-4, 1e6, 1)],
    ids=["rtt-b1", "rtt-b8", "bytes-b8", "slow-link-b1"],
)
def test_latency_never_worse_than_any_policy_on_its_model(rtt: float, rate: float, batch: int) -> None:
    f, c, coact = _instance(1, rtt, rate)
    wl = Workload.uniform(3, batch, top_k=4, bytes_per_token=4096.0, expert_time_s=20e-6)
    costs = {name: expected_latency(p(f, c, coact=coact, workload=wl), c, f, coact, wl)
             for name, p in POLICIES.items()}
    best_other = min(v for k, v in costs.items() if k not in ("latency", "pipeline", "route"))  # stay-home
    assert costs["latency"] <= best_other * (1 + 1e-12), costs


def test_latency_keeps_current_under_hysteresis_and_moves_without() -> None:
    f, c, coact = _instance(2, 4e-3, 62.5e6)
    wl = Workload.uniform(3, 1, top_k=4)
    current = POLICIES["uniform"](f, c)
    fresh = POLICIES["latency"](f, c, coact=coact, current=current, workload=wl)
    assert not fresh.equals(current)
    assert expected_latency(fresh, c, f, coact, wl) < expected_latency(current, c, f, coact, wl)
    sticky = Workload.uniform(3, 1, top_k=4, min_gain=0.99)
    assert POLICIES["latency"](f, c, coact=coact, current=current, workload=sticky).equals(current)
    costly = Workload.uniform(3, 1, top_k=4, migration_cost_s=10.0)
    assert POLICIES["latency"](f, c, coact=coact, current=current, workload=costly).equals(current)


def test_latency_migration_cost_moves_less() -> None:
    """A small per-replica migration cost keeps more of `current` than none does."""
    f, c, coact = _instance(3, 4e-3, 62.5e6)
    wl0 = Workload.uniform(3, 1, top_k=4)
    current = POLICIES["prism"](f, c)
    cur = current.node_view(c)
    moved = {}
    for cost in (0.0, 2e-4):
        wl = Workload.uniform(3, 1, top_k=4, migration_cost_s=cost)
        p = POLICIES["latency"](f, c, coact=coact, current=current, workload=wl)
        validate(p, c, f.shape[1], f.shape[2])
        moved[cost] = int((p.node_view(c) & ~cur).sum())
    assert moved[2e-4] < moved[0.0]
    assert expected_latency(POLICIES["latency"](f, c, coact=coact, workload=wl0), c, f, coact, wl0) <= (
        expected_latency(current, c, f, coact, wl0)
    )


def test_a_node_that_loads_slowly_gets_fewer_new_replicas() -> None:
    """Migration is charged by the node that loads each replica (over its own link): with node 2's
    loads dear and the others' free, the plan adds fewer replicas on node 2 than with every node's free,
    and still adds some on the others (a uniform cost of the same mean moves next to nothing); the
    workload refuses a cost per node of the wrong length."""
    f, c, coact = _instance(3, 4e-3, 62.5e6)
    current = POLICIES["prism"](f, c)
    cur = current.node_view(c)

    def added(cost: float | list[float]) -> np.ndarray:
        wl = Workload.uniform(3, 1, top_k=4, migration_cost_s=np.asarray(cost))
        p = POLICIES["latency"](f, c, coact=coact, current=current, workload=wl)
        validate(p, c, f.shape[1], f.shape[2])
        return (p.node_view(c) & ~cur).sum(axis=(1, 2))

    free, dear_on_2 = added(0.0), added([0.0, 0.0, 1e-3])
    assert free[2] > 0
    assert dear_on_2[2] < free[2]
    assert dear_on_2[:2].min() > 0
    with pytest.raises(InvalidInputError, match="migration_cost_s"):
        Workload.uniform(3, 1, migration_cost_s=np.ones(2))
