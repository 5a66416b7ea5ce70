from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.expert_host.residency import format_experts, parse_experts

LAYERS = [1, 2, 3, 5]


@given(st.sets(st.tuples(st.sampled_from(LAYERS), st.integers(0, 15))))
def test_format_then_parse_round_trips(pairs: set[tuple[int, int]]) -> None:
    assert parse_experts(format_experts(pairs), LAYERS, 16) == sorted(pairs)


def test_wildcards_and_ranges() -> None:
    assert parse_experts("*:0-1", LAYERS, 4) == [(layer, e) for layer in LAYERS for e in (0, 1)]
    assert parse_experts("2:1, 5:*", LAYERS, 2) == [(2, 1), (5, 0), (5, 1)]
