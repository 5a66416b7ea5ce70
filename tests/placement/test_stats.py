"""Activation statistics: sliding-window counts, co-activation sample, and shift detection."""

from __future__ import annotations

import numpy as np
import pytest

from services.placement.calibration import usage
from services.placement.errors import InvalidInputError
from services.placement.stats import RoutingStats, StatsConfig
from services.placement.synthetic import PRESETS, Traffic, generate
from services.placement.traces import node_layer_counts

DS = PRESETS["deepseek-v2-lite"]


def _feed(stats: RoutingStats, node: int, experts: np.ndarray, batch: int = 16) -> list[int]:
    """Feed tokens in decode-step-sized batches; return the token counts at which shifts fired."""
    fired = []
    for s in range(0, len(experts), batch):
        ev = stats.add_tokens(node, experts[s : s + batch])
        if ev is not None:
            fired.append(ev.at_token)
    return fired


@pytest.mark.parametrize(("preset", "seed"), [("deepseek-v2-lite", 1), ("mixtral-8x7b", 0)])
def test_steady_workload_never_triggers(preset: str, seed: int) -> None:
    shape = PRESETS[preset]
    t = generate(shape, Traffic.dedicated(2, 2, 120), seed=seed)
    stats = RoutingStats(2, shape.num_layers, shape.num_experts, shape.top_k)
    for n in (0, 1):
        assert _feed(stats, n, t.experts[t.node == n]) == []
    assert not stats.events


def test_switch_detected_fast_and_counts_follow_the_new_workload() -> None:
    t = generate(DS, Traffic.dedicated(2, 2, 150).with_switch(75), seed=4)
    u = usage(t)                                                    # [D, L, E] per-domain usage
    stats = RoutingStats(2, DS.num_layers, DS.num_experts, DS.top_k)
    for n in (0, 1):
        x, dom = t.experts[t.node == n], t.domain[t.node == n]
        change = int(np.argmax(dom != dom[0]))
        old, new = int(dom[0]), int(dom[change])
        fired = _feed(stats, n, x[: change + 512])                  # 512 tokens after the switch
        assert len(fired) == 1, f"node {n}: expected one shift, got {fired}"
        event = stats.events[-1]
        assert change < event.at_token <= change + 384              # within 6 chunks of the switch
        assert abs(event.cut_token - change) <= 64                  # change point within a chunk
        f = stats.counts()[n]
        p = f / f.sum(-1, keepdims=True)
        tv_new = 0.5 * np.abs(p - u[new]).sum(-1).mean()
        tv_old = 0.5 * np.abs(p - u[old]).sum(-1).mean()
        assert tv_new < 0.5 * tv_old, (tv_new, tv_old)
        # the window now starts at the cut: only new-workload tokens (give or take a chunk)
        assert stats.window_tokens()[n] <= change + 512 - event.cut_token + 64


def test_sliding_window_counts_are_exact() -> None:
    t = generate(DS, Traffic.dedicated(1, 1, 80), seed=2)
    x = t.experts[:5000]
    cfg = StatsConfig()
    stats = RoutingStats(1, DS.num_layers, DS.num_experts, DS.top_k, cfg)
    assert _feed(stats, 0, x) == []
    kept = cfg.window_chunks * cfg.chunk_tokens + 5000 % cfg.chunk_tokens   # 64 full chunks + the open one
    expect = node_layer_counts(x[-kept:], np.zeros(kept, dtype=np.int64), 1, DS.num_experts)
    np.testing.assert_array_equal(stats.counts(), expect)
    assert stats.window_tokens()[0] == kept


def test_counts_input_matches_token_input() -> None:
    t = generate(DS, Traffic.dedicated(1, 1, 10), seed=0)
    a = RoutingStats(1, DS.num_layers, DS.num_experts, DS.top_k)
    b = RoutingStats(1, DS.num_layers, DS.num_experts, DS.top_k)
    for s in range(0, 300, 30):
        x = t.experts[s : s + 30]
        a.add_tokens(0, x)
        b.add_counts(0, node_layer_counts(x, np.zeros(len(x), dtype=np.int64), 1, DS.num_experts)[0], len(x))
    np.testing.assert_array_equal(a.counts(), b.counts())


def test_coactivation_sample_holds_recent_real_sets() -> None:
    t = generate(DS, Traffic.dedicated(2, 1, 10), seed=0)
    cfg = StatsConfig(samples_per_node=8, sample_every=4)
    stats = RoutingStats(3, DS.num_layers, DS.num_experts, DS.top_k, cfg)
    x = t.experts[t.node == 0]
    _feed(stats, 0, x, batch=7)
    co = stats.coactivation()
    assert co.sets.shape == (3, 8, DS.num_layers, DS.top_k)
    np.testing.assert_array_equal(co.valid[0], True)
    np.testing.assert_array_equal(co.valid[1:], False)
    last = (len(x) - 1) // 4 * 4                                    # the newest sampled token
    np.testing.assert_array_equal(co.sets[0, -1], x[last])
    assert co.tokens[0, 0] == len(x)


def test_bad_input() -> None:
    stats = RoutingStats(2, 3, 4, 2)
    with pytest.raises(InvalidInputError, match="node must lie"):
        stats.add_counts(2, np.zeros((3, 4)), 1)
    with pytest.raises(InvalidInputError, match="counts must be"):
        stats.add_counts(0, -np.ones((3, 4)), 1)
    with pytest.raises(InvalidInputError, match="experts must be"):
        stats.add_tokens(0, np.zeros((5, 3, 3), dtype=int))
    with pytest.raises(InvalidInputError):
        StatsConfig(window_chunks=4, short_chunks=4)
