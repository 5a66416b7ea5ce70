"""Invariants of every policy on random instances, `optimal` against brute force, and purity."""

from __future__ import annotations

import itertools
import subprocess
import sys
from typing import get_args

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.placement import (
    CapacityError,
    Cluster,
    CoverageError,
    InfeasibleError,
    InvalidInputError,
    Placement,
    PolicyName,
    Workload,
    check_inputs,
    proxy_objective,
    validate,
)
from services.placement.policies import POLICIES, get_policy


@st.composite
def instances(draw: st.DrawFn, max_nodes: int = 4) -> tuple[np.ndarray, Cluster]:
    """Random counts [N, L, E] (with zeros and ties) and a feasible cluster of 1-2 hosts per node."""
    n = draw(st.integers(1, max_nodes))
    n_layers = draw(st.integers(1, 3))
    n_experts = draw(st.integers(1, 6))
    hosts_per_node = [draw(st.integers(1, 2)) for _ in range(n)]
    host_node = np.repeat(np.arange(n), hosts_per_node)
    need = n_layers * n_experts
    slots = np.array([draw(st.integers(0, need)) for _ in host_node])
    short = need - int(slots.sum())
    if short > 0:  # make it feasible: give the shortfall to one host
        slots[draw(st.integers(0, slots.size - 1))] += short
    speed = np.array([draw(st.sampled_from([0.5, 1.0, 2.0])) for _ in host_node])
    rtt = draw(st.sampled_from([0.0, 2e-4, 4e-3]))
    values = st.integers(0, 20) if draw(st.booleans()) else st.sampled_from([0, 1, 5])
    f = np.array([draw(values) for _ in range(n * need)], dtype=float).reshape(n, n_layers, n_experts)
    return f, Cluster(host_node, slots, speed, np.array(rtt), np.array(62.5e6))


FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(instances())
def test_every_policy_valid_deterministic_and_optimal_is_best(inst: tuple[np.ndarray, Cluster]) -> None:
    f, c = inst
    wl = Workload.uniform(c.num_nodes, 2, top_k=min(2, f.shape[2]))
    proxies = {}
    for name, policy in POLICIES.items():
        p = policy(f, c, workload=wl)
        validate(p, c, f.shape[1], f.shape[2])
        assert policy(f, c, workload=wl).equals(p), f"{name} is not deterministic"
        proxies[name] = proxy_objective(f, p, c)
    assert all(proxies["optimal"] <= v + 1e-9 for v in proxies.values()), proxies


@FAST
@given(instances(), st.sampled_from([0.25, 1.0, 3.0]))
def test_routed_policies_fit_their_foreign_kv(inst: tuple[np.ndarray, Cluster], kv: float) -> None:
    """`pipeline` and `route` keep every node within its slots once the other homes' KV for the layers
    it runs for them is counted, however tight the memory (the instances often have no spare slot)."""
    f, c = inst
    wl = Workload.uniform(c.num_nodes, 2, top_k=min(2, f.shape[2]), kv_slots_per_layer=kv)
    for name in ("pipeline", "route"):
        validate(get_policy(name)(f, c, workload=wl), c, f.shape[1], f.shape[2], kv_slots_per_layer=kv)


def brute_force_optimum(f: np.ndarray, node_slots: np.ndarray) -> float:
    """min Σ f · remote over every node-level holding pattern (2^(N·L·E) of them)."""
    n, cells = f.shape[0], f.shape[1] * f.shape[2]
    flat = f.reshape(n, cells)
    best = np.inf
    for bits in itertools.product([False, True], repeat=n * cells):
        x = np.array(bits).reshape(n, cells)
        if np.all(x.any(axis=0)) and np.all(x.sum(axis=1) <= node_slots):
            best = min(best, float(flat[~x].sum()))
    return best


@settings(max_examples=40, deadline=None)
@given(instances(max_nodes=3).filter(lambda fc: fc[0].size <= 10))
def test_optimal_equals_brute_force(inst: tuple[np.ndarray, Cluster]) -> None:
    f, c = inst
    p = POLICIES["optimal"](f, c)
    assert proxy_objective(f, p, c) == pytest.approx(brute_force_optimum(f, c.node_slots()), abs=1e-9)


def test_registry_matches_policy_names() -> None:
    assert set(POLICIES) == set(get_args(PolicyName))
    with pytest.raises(InvalidInputError, match="accepted: uniform"):
        get_policy("greedy")


@pytest.mark.parametrize(
    ("counts", "error", "message"),
    [
        (np.ones((2, 4)), InvalidInputError, "shape"),
        (np.ones((3, 1, 4)), InvalidInputError, "3 nodes"),
        (-np.ones((2, 1, 4)), InvalidInputError, ">= 0"),
        (np.full((2, 1, 4), np.nan), InvalidInputError, "NaN"),
        (np.ones((2, 2, 4)), InfeasibleError, "6 slots in total cannot hold 8"),
    ],
)
def test_bad_inputs_raise_clear_errors(counts: np.ndarray, error: type[Exception], message: str) -> None:
    c = Cluster.from_slots([3, 3])
    with pytest.raises(error, match=message):
        check_inputs(counts, c)
    with pytest.raises(error):
        POLICIES["latency"](counts, c)


def test_validate_names_the_broken_rule() -> None:
    c = Cluster.from_slots([1, 1])
    with pytest.raises(CoverageError, match="layer 0, expert 1"):
        validate(Placement(np.array([[[True, False]], [[True, False]]])), c, 1, 2)
    with pytest.raises(CapacityError, match="host 0 holds 2"):
        validate(Placement(np.array([[[True, True]], [[False, False]]])), c, 1, 2)


def test_optimal_solves_the_published_scale_exactly_and_returns_integral_sets() -> None:
    """3 nodes (1, 1, 2 GPUs) × 26 layers × 64 experts, ~30% of experts per GPU."""
    rng = np.random.default_rng(0)
    f = rng.poisson(rng.gamma(0.5, size=(3, 26, 64)) * 30).astype(float)
    slots = int(0.3 * 26 * 64)
    c = Cluster(np.array([0, 1, 2, 2]), np.full(4, slots), np.ones(4), np.array(4e-3), np.array(62.5e6))
    p = POLICIES["optimal"](f, c)
    validate(p, c, 26, 64)
    objective = proxy_objective(f, p, c)
    for name in ("prism", "eplb", "redundance"):
        assert objective <= proxy_objective(f, POLICIES[name](f, c), c)


def test_pure_placement_modules_do_not_import_nats() -> None:
    code = (
        "import sys\n"
        "import services.placement, services.placement.policies, services.placement.latency_model\n"
        "import services.placement.topology, cli.place\n"
        "bad = sorted(m for m in sys.modules if m == 'nats' or m.startswith('nats.'))\n"
        "print(bad); raise SystemExit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
