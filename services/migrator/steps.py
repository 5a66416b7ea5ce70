"""Turn a change of plan into an ordered list of load/unload steps that never drops coverage. Pure.

Make-before-break: an expert is unloaded from a host only while another host holds it (and stays
subscribed), and a host is only asked to load what fits in its free slots at that moment. Steps
alternate between "load everything that fits" and "unload everything that is safe", which frees room
for the next loads. When full hosts must swap experts, one expert is staged on a host with a free slot
(and unloaded there later). With no free slot anywhere the change is refused.

Shape of the data: host name → set of (layer, expert) keys; capacity in expert slots per host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Key = tuple[int, int]


class MigrationPlanError(ValueError):
    """The target cannot be reached without dropping an expert or overfilling a host."""


@dataclass(frozen=True)
class Step:
    kind: Literal["load", "unload"]
    host: str
    experts: tuple[Key, ...]


def plan_steps(
    current: Mapping[str, set[Key]], target: Mapping[str, set[Key]], capacity: Mapping[str, int]
) -> list[Step]:
    """Ordered steps from `current` to `target` residency. Hosts missing from `target` keep nothing."""
    held = {host: set(keys) for host, keys in current.items()}
    for host in target:
        held.setdefault(host, set())
    _check_target(target, capacity)
    steps: list[Step] = []
    staged: set[tuple[str, Key]] = set()  # temporary copies, kept until a target holder has the expert
    rounds = 4 * sum(len(k) for k in target.values()) + 4  # each round moves at least one expert
    for _ in range(rounds):
        # Loads that let a host drop an expert come first; plain loads wait until no expert is left
        # over anywhere, so they never take the free slots that unlocking loads or staging need.
        progress = _loads_that_fit(held, target, capacity, only=_unlocking(held, target))
        progress += _safe_unloads(held, target, staged)
        if not progress and any(held[h] - target.get(h, set()) for h in held):
            progress = _stage_one(held, target, capacity, staged)
        if not progress:
            progress = _loads_that_fit(held, target, capacity)
        if not progress:
            break
        steps.extend(progress)
    if any(held[h] != target.get(h, set()) for h in held):
        stuck = sorted(h for h in held if held[h] != target.get(h, set()))
        raise MigrationPlanError(f"cannot reach the new plan on hosts {stuck} without dropping an expert")
    return steps


def _check_target(target: Mapping[str, set[Key]], capacity: Mapping[str, int]) -> None:
    for host, keys in target.items():
        if len(keys) > capacity.get(host, 0):
            raise MigrationPlanError(
                f"host {host} is asked to hold {len(keys)} experts but has {capacity.get(host, 0)} slots"
            )


def _unlocking(held: dict[str, set[Key]], target: Mapping[str, set[Key]]) -> set[Key]:
    """Experts held only where they are not wanted: loading them at a target holder frees a slot."""
    wanted_where_held = {k for h, keys in held.items() for k in keys & target.get(h, set())}
    leftover = {k for h, keys in held.items() for k in keys - target.get(h, set())}
    return leftover - wanted_where_held


def _loads_that_fit(
    held: dict[str, set[Key]],
    target: Mapping[str, set[Key]],
    capacity: Mapping[str, int],
    only: set[Key] | None = None,
) -> list[Step]:
    steps = []
    for host in sorted(target):
        missing = sorted((target[host] - held[host]) & only if only is not None else target[host] - held[host])
        room = capacity.get(host, 0) - len(held[host])
        if missing and room > 0:
            chosen = tuple(missing[:room])
            held[host].update(chosen)
            steps.append(Step("load", host, chosen))
    return steps


def _safe_unloads(
    held: dict[str, set[Key]], target: Mapping[str, set[Key]], staged: set[tuple[str, Key]]
) -> list[Step]:
    steps = []
    for host in sorted(held):
        extra = sorted(held[host] - target.get(host, set()))
        removable = []
        for key in extra:
            others = [g for g, keys in held.items() if g != host and key in keys]
            # a staged copy waits for a permanent holder; any other copy may stand in for a regular one
            safe = any(key in target.get(g, set()) for g in others) if (host, key) in staged else bool(others)
            if safe:
                held[host].discard(key)
                staged.discard((host, key))
                removable.append(key)
        if removable:
            steps.append(Step("unload", host, tuple(removable)))
    return steps


def _stage_one(
    held: dict[str, set[Key]], target: Mapping[str, set[Key]], capacity: Mapping[str, int], staged: set[tuple[str, Key]]
) -> list[Step]:
    """Copy one expert that must leave a full host, and has no other holder, to a host with room."""
    for host in sorted(held):
        for key in sorted(held[host] - target.get(host, set())):
            for spare in sorted(held):
                if spare != host and key not in held[spare] and len(held[spare]) < capacity.get(spare, 0):
                    held[spare].add(key)
                    staged.add((spare, key))
                    return [Step("load", spare, (key,))]
    return []
