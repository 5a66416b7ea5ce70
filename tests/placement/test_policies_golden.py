"""Small placements worked out by hand, one or more per policy (the working is in each docstring)."""

from __future__ import annotations

import numpy as np
import pytest

from services.placement import Cluster, Placement, proxy_objective, validate
from services.placement.policies import POLICIES, get_policy
from services.placement.policies.prism import entropy_counts


def held(p: Placement) -> list[list[tuple[int, int]]]:
    """Per host, the sorted (layer, expert) pairs it holds."""
    return [[(int(l_), int(e)) for l_, e in np.argwhere(h)] for h in p.hosts]


def test_uniform_linear_layout_like_vllm() -> None:
    """2 equal hosts, 2 layers × 4 experts: expert-major order (e0 l0, e0 l1, e1 l0, ...) cut in two
    blocks of 4 → host 0 holds experts 0, 1 of both layers, host 1 experts 2, 3 (vLLM's layout)."""
    c = Cluster.from_slots([4, 4])
    p = POLICIES["uniform"](np.ones((2, 2, 4)), c)
    assert held(p) == [[(0, 0), (0, 1), (1, 0), (1, 1)], [(0, 2), (0, 3), (1, 2), (1, 3)]]


def test_uniform_spreads_in_proportion_to_slots() -> None:
    """Hosts with 2 and 6 slots, 1 layer × 4 experts: shares 4·2/8 = 1 and 4·6/8 = 3 → host 0 holds
    expert 0, host 1 experts 1-3; host 1's three spare slots stay empty (no replication)."""
    c = Cluster.from_slots([2, 6])
    p = POLICIES["uniform"](np.ones((2, 1, 4)), c)
    assert held(p) == [[(0, 0)], [(0, 1), (0, 2), (0, 3)]]


def test_redundance_copies_the_globally_hottest() -> None:
    """2 hosts × 3 slots, 1 layer × 4 experts, totals over nodes (1, 9, 5, 2). Uniform: host 0 {0, 1},
    host 1 {2, 3}. Hotness order 1, 2, 3, 0. Host 0's spare slot takes the hottest it lacks (2),
    host 1's the hottest it lacks (1)."""
    f = np.array([[[1, 9, 0, 0]], [[0, 0, 5, 2]]], dtype=float)
    p = POLICIES["redundance"](f, Cluster.from_slots([3, 3]))
    assert held(p) == [[(0, 0), (0, 1), (0, 2)], [(0, 1), (0, 2), (0, 3)]]


def test_eplb_replicates_the_heaviest_and_packs() -> None:
    """1 layer, loads (8, 4, 2, 2) summed over nodes, 2 equal hosts × 3 slots → 2 redundant slots.
    Replicate: expert 0 (8/1), then expert 0 is at its cap of 2 hosts, so expert 1 (4/1) → counts
    (2, 2, 1, 1), per-replica loads (4, 2, 2, 2). Pack by descending per-replica load: expert 0 on
    both hosts (4, 4), expert 1 on both (6, 6), expert 2 → host 0 (tie, lower index; 8, 6), expert 3 →
    host 1 (8, 8)."""
    f = np.array([[[5, 4, 0, 2]], [[3, 0, 2, 0]]], dtype=float)
    p = POLICIES["eplb"](f, Cluster.from_slots([3, 3]))
    assert held(p) == [[(0, 0), (0, 1), (0, 2)], [(0, 0), (0, 1), (0, 3)]]


def test_eplb_gives_faster_hosts_more_load() -> None:
    """No redundancy (2 + 2 slots, 4 experts), loads (6, 3, 2, 1), host speeds 2 and 1. Packing compares
    (load + w) / speed: expert 0: 6/2 = 3 vs 6 → host 0; expert 1: 9/2 = 4.5 vs 3 → host 1; expert 2:
    8/2 = 4 vs 5 → host 0 (now full); expert 3 → host 1."""
    f = np.array([[[6, 3, 2, 1]], [[0, 0, 0, 0]]], dtype=float)
    p = POLICIES["eplb"](f, Cluster.from_slots([2, 2], speed=[2.0, 1.0]))
    assert held(p) == [[(0, 0), (0, 2)], [(0, 1), (0, 3)]]


# 2 nodes × 4 slots, 2 layers × 4 experts (8 slots for 8 experts: a partition).
PRISM_F = np.array(
    [
        [[4, 4, 0, 0], [1, 1, 1, 1]],  # node 0: entropies ln 2, ln 4
        [[0, 0, 3, 1], [0, 0, 0, 8]],  # node 1: entropies 0.562, 0
    ],
    dtype=float,
)


def test_prism_entropy_counts_and_coverage_repair() -> None:
    """Stage 1: node 0 splits 4 slots ∝ (ln 2, ln 4) → (1.33, 2.67) → largest remainder (1, 3); node 1
    ∝ (0.562, 0) → (4, 0). Stage 2: node 0 takes layer 0's expert 0 (4 ties 4: lower index) and layer
    1's experts 0, 1, 2 (all tie); node 1 takes all of layer 0. Expert (1, 3) is uncovered; the only
    duplicate is (0, 0): evicting it costs node 0 f=4 - 1 = 3, node 1 f=0 - 8 = -8 → node 1 drops
    (0, 0) and takes (1, 3). Proxy: node 0 misses (0, 1) = 4 and (1, 3) = 1 → 5."""
    c = Cluster.from_slots([4, 4])
    np.testing.assert_array_equal(entropy_counts(PRISM_F, c.node_slots()), [[1, 3], [4, 0]])
    p = POLICIES["prism"](PRISM_F, c)
    assert held(p) == [[(0, 0), (1, 0), (1, 1), (1, 2)], [(0, 1), (0, 2), (0, 3), (1, 3)]]
    assert proxy_objective(PRISM_F, p, c) == 5.0


def test_optimal_beats_prism_on_the_same_example() -> None:
    """Same instance. Node 1's calls are (0, 2) = 3, (0, 3) = 1, (1, 3) = 8: it keeps all three plus one
    more; node 0 keeps (0, 0), (0, 1) = 8 and two of layer 1's experts (1 each). The fourth slot of
    node 1 must take node 0's remaining layer-1 expert → node 0 misses two of layer 1: proxy 2."""
    c = Cluster.from_slots([4, 4])
    p = POLICIES["optimal"](PRISM_F, c)
    validate(p, c, 2, 4)
    assert proxy_objective(PRISM_F, p, c) == 2.0
    view = p.node_view(c)
    assert view[0, 0, :2].all()
    assert view[1, 0, 2:].all()
    assert view[1, 1, 3]


def test_optimal_keeps_each_node_its_hottest_when_slots_allow() -> None:
    """3 nodes × 2 slots, 1 layer × 4 experts, each node using two experts: node 0 (0, 1), node 1
    (1, 2), node 2 (2, 3) → every node holds its own two, all covered, proxy 0."""
    f = np.array([[[5, 5, 0, 0]], [[0, 5, 5, 0]], [[0, 0, 5, 5]]], dtype=float)
    c = Cluster.from_slots([2, 2, 2])
    p = POLICIES["optimal"](f, c)
    assert proxy_objective(f, p, c) == 0.0
    assert list(p.to_triples(c)) == [(0, 0, 0), (0, 0, 1), (1, 0, 1), (1, 0, 2), (2, 0, 2), (2, 0, 3)]


def test_latency_gives_whole_layers_when_round_trips_dominate() -> None:
    """2 nodes × 2 slots, 2 layers × 2 experts, top-2: every token uses both experts of every layer.
    The proxy is the same (2 of 4 calls local) for "one expert of each layer per node" and for "one
    whole layer per node"; but the first pays a round trip in both layers, the second in one only,
    so `latency` must give each node a whole layer."""
    f = np.full((2, 2, 2), 10.0)
    c = Cluster.from_slots([2, 2], rtt_s=0.01, bandwidth_Bps=1e9)
    from services.placement import Workload
    from services.placement.latency_model import expected_latency

    wl = Workload.uniform(2, 1, top_k=2)
    p = POLICIES["latency"](f, c, workload=wl)
    view = p.node_view(c)
    assert sorted(view.sum(axis=2).tolist()) == [[0, 2], [2, 0]]
    split = Placement(np.array([[[1, 0], [1, 0]], [[0, 1], [0, 1]]], dtype=bool))
    assert proxy_objective(f, split, c) == proxy_objective(f, p, c)
    assert expected_latency(p, c, f, workload=wl) < expected_latency(split, c, f, workload=wl) - 0.009


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_covers_the_golden_instance(name: str) -> None:
    c = Cluster.from_slots([4, 4])
    validate(get_policy(name)(PRISM_F, c), c, 2, 4)
