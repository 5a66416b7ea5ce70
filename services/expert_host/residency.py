"""Which experts a host holds: parsing the `experts` setting and checking the memory budget. Pure.

Spec syntax (env- and CLI-friendly): comma-separated `LAYERS:EXPERTS` items, each side `*`, `N` or
`A-B` (inclusive). `*:*` is everything; `0-3:0,1` is not valid (use `0-3:0-1`).
"""

from __future__ import annotations

from collections.abc import Iterable


class ResidencyError(ValueError):
    """The expert spec is malformed, names experts the model lacks, or does not fit in memory."""


def parse_experts(spec: str, moe_layers: Iterable[int], num_experts: int) -> list[tuple[int, int]]:
    """Expand `spec` to sorted (layer, expert) pairs of this model."""
    layers = sorted(moe_layers)
    chosen: set[tuple[int, int]] = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        left, sep, right = item.partition(":")
        if not sep:
            raise ResidencyError(f"expert spec item {item!r} needs the form LAYERS:EXPERTS, e.g. 1:0-7 or *:3")
        for layer in _expand(left, layers, "layer"):
            for expert in _expand(right, list(range(num_experts)), "expert"):
                chosen.add((layer, expert))
    return sorted(chosen)


def _expand(text: str, valid: list[int], what: str) -> list[int]:
    text = text.strip()
    if text == "*":
        return valid
    try:
        first, _, last = text.partition("-")
        values = list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ResidencyError(f"{what} range {text!r} must be *, N or A-B") from None
    missing = sorted(set(values) - set(valid))
    if missing:
        raise ResidencyError(f"{what} {missing[0]} does not exist; the model has {what}s {valid[0]}..{valid[-1]}")
    return values


def format_experts(pairs: Iterable[tuple[int, int]]) -> str:
    """The inverse of `parse_experts`, compact: consecutive experts of a layer become ranges."""
    by_layer: dict[int, list[int]] = {}
    for layer, expert in sorted(pairs):
        by_layer.setdefault(layer, []).append(expert)
    items = []
    for layer, experts in by_layer.items():
        start = prev = experts[0]
        for expert in [*experts[1:], -1]:  # -1 closes the last run
            if expert == prev + 1:
                prev = expert
                continue
            items.append(f"{layer}:{start}" if start == prev else f"{layer}:{start}-{prev}")
            start = prev = expert
    return ",".join(items)


def check_budget(num_experts: int, expert_bytes: int, limit_bytes: int) -> None:
    """Raise ResidencyError when `num_experts` of `expert_bytes` each exceed `limit_bytes`."""
    need = num_experts * expert_bytes
    if need > limit_bytes:
        raise ResidencyError(
            f"{num_experts} experts need {need / 2**20:.1f} MiB but the host's memory limit is "
            f"{limit_bytes / 2**20:.1f} MiB ({limit_bytes // max(expert_bytes, 1)} experts fit)"
        )
