"""Make-before-break step planning: coverage never drops, hosts never overfill."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.migrator.steps import MigrationPlanError, Step, plan_steps

KEYS = [(layer, e) for layer in range(2) for e in range(4)]


def replay(current: dict[str, set], steps: list[Step], capacity: dict[str, int]) -> dict[str, set]:
    held = {h: set(k) for h, k in current.items()}
    covered = set().union(*held.values())
    for step in steps:
        held.setdefault(step.host, set())
        if step.kind == "load":
            held[step.host] |= set(step.experts)
            assert len(held[step.host]) <= capacity[step.host]
        else:
            held[step.host] -= set(step.experts)
        assert set().union(*held.values()) >= covered & set(KEYS), "an expert lost its last holder"
    return held


@st.composite
def placements(draw: st.DrawFn) -> tuple[dict, dict, dict]:
    hosts = ["a", "b", "c"]
    capacity = {h: draw(st.integers(3, 6)) for h in hosts}

    def one() -> dict[str, set]:
        keys = draw(st.permutations(KEYS))
        out: dict[str, set] = {h: set() for h in hosts}
        order = [h for h in hosts for _ in range(capacity[h])]
        for key, host in zip(keys, draw(st.permutations(order)), strict=False):
            out[host].add(key)
        return out

    return one(), one(), capacity


@given(placements())
@settings(max_examples=200, deadline=None)
def test_any_valid_change_is_reached_safely(case: tuple[dict, dict, dict]) -> None:
    current, target, capacity = case
    if sum(len(v) for v in target.values()) < len(KEYS):  # the strategy can leave keys uncovered when full
        return
    try:
        steps = plan_steps(current, target, capacity)
    except MigrationPlanError:
        # only legitimate when no host has a free slot to stage a swap through
        assert all(len(current[h]) >= capacity[h] for h in current)
        return
    assert replay(current, steps, capacity) == target


def test_swap_between_two_full_hosts_is_refused() -> None:
    current = {"a": {(0, 0)}, "b": {(0, 1)}}
    target = {"a": {(0, 1)}, "b": {(0, 0)}}
    with pytest.raises(MigrationPlanError, match="without dropping"):
        plan_steps(current, target, {"a": 1, "b": 1})


def test_move_loads_before_it_unloads() -> None:
    steps = plan_steps({"a": {(0, 0), (0, 1)}, "b": set()}, {"a": {(0, 0)}, "b": {(0, 1)}}, {"a": 2, "b": 2})
    assert steps == [Step("load", "b", ((0, 1),)), Step("unload", "a", ((0, 1),))]


def test_target_over_capacity_is_refused() -> None:
    with pytest.raises(MigrationPlanError, match="has 1 slots"):
        plan_steps({"a": set()}, {"a": {(0, 0), (0, 1)}}, {"a": 1})


@st.composite
def filling_targets(draw: st.DrawFn) -> tuple[dict, dict, dict]:
    """Targets that fill every slot with replicas (what activation-aware policies produce)."""
    current, target, capacity = draw(placements())
    for host in target:
        spare = [k for k in KEYS if k not in target[host]]
        room = capacity[host] - len(target[host])
        target[host] |= set(draw(st.permutations(spare))[:room])
    return current, target, capacity


@given(filling_targets())
@settings(max_examples=300, deadline=None)
def test_full_replicated_targets_are_reached(case: tuple[dict, dict, dict]) -> None:
    current, target, capacity = case
    if set().union(*target.values()) != set(KEYS) or set().union(*current.values()) != set(KEYS):
        return
    if all(len(current[h]) >= capacity[h] for h in current):
        return  # no free slot to move through
    assert replay(current, plan_steps(current, target, capacity), capacity) == target


def test_filling_free_slots_first_does_not_deadlock() -> None:
    """The demo's case in small: hosts with room, a target that fills every slot with replicas."""
    a, b = (0, 0), (0, 1)
    current = {"x": {a}, "y": {b}}
    target = {"x": {b, (0, 2)}, "y": {a, (0, 2)}}
    capacity = {"x": 2, "y": 2}
    current["x"].add((0, 2))
    assert replay(current, plan_steps(current, target, capacity), capacity) == target
