"""Synthetic routing traces: seeded, shaped as asked, and calibrated to the real statistics of FACTS.md."""

from __future__ import annotations

import numpy as np
import pytest

from services.placement.calibration import check, routing_stats
from services.placement.errors import InvalidInputError
from services.placement.synthetic import PRESETS, Shift, Traffic, generate


@pytest.mark.parametrize("preset", ["deepseek-v2-lite", "mixtral-8x7b"])
def test_calibrated_to_facts(preset: str) -> None:
    """Every statistic FACTS.md gives lies in its range, for each domain (or pair of domains)."""
    trace = generate(PRESETS[preset], Traffic.dedicated(4, 4, 60), seed=11)
    results = check(routing_stats(trace), preset)
    print(f"\n{preset}: generator statistics beside FACTS.md ({trace.num_tokens} tokens, 4 domains)")
    for r in results:
        print("  " + r.line())
    bad = [r.line() for r in results if not r.ok]
    assert not bad, "synthetic routing outside the real ranges:\n" + "\n".join(bad)


def test_calibration_detects_uncalibrated_routing() -> None:
    """The check can fail: uniformly random routing is far outside the DeepSeek ranges."""
    t = generate(PRESETS["deepseek-v2-lite"], Traffic.dedicated(2, 2, 20), seed=0)
    rng = np.random.default_rng(0)
    rand = np.argsort(rng.random((t.num_tokens, t.num_layers, t.num_experts)), axis=-1)[..., : t.top_k]
    flat = type(t)(experts=rand, weights=t.weights, node=t.node, domain=t.domain, request=t.request,
                   position=t.position, meta=t.meta)
    failed = {r.name for r in check(routing_stats(flat), "deepseek-v2-lite") if not r.ok}
    assert {"entropy", "busiest_over_mean", "domain_tv", "reuse_vs_chance", "next_layer_top20"} <= failed


def test_seeded_and_shaped() -> None:
    shape = PRESETS["mixtral-8x7b"]
    traffic = Traffic.dedicated(3, 2, 10, tokens_per_request=(4, 8))
    a, b, c = generate(shape, traffic, seed=1), generate(shape, traffic, seed=1), generate(shape, traffic, seed=2)
    np.testing.assert_array_equal(a.experts, b.experts)
    assert not np.array_equal(a.experts, c.experts) or a.num_tokens != c.num_tokens
    assert a.experts.shape[1:] == (32, 2)
    assert a.meta.num_experts == 8
    assert a.meta.hidden_size == 4096
    assert len(np.unique(a.request)) == 30
    assert np.bincount(a.node).size == 3
    # weights sorted descending per token and layer, normalised
    w = a.weights.astype(np.float32)
    assert np.all(w[..., 0] >= w[..., 1])
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=2e-3)
    # positions run 0..len-1 inside each request
    for r in np.unique(a.request)[:5]:
        pos = a.position[a.request == r]
        np.testing.assert_array_equal(pos, np.arange(pos.size))
        assert 4 <= pos.size <= 8


def test_domain_mix_and_shift() -> None:
    """Dedicated nodes serve their own domain; after a shift, the new one."""
    traffic = Traffic.dedicated(2, 2, 40, tokens_per_request=(2, 2)).with_switch(at_request=20)
    t = generate(PRESETS["mixtral-8x7b"], traffic, seed=0)
    for node in (0, 1):
        req = np.unique(t.request[t.node == node])
        doms = np.array([t.domain[t.request == r][0] for r in req])
        np.testing.assert_array_equal(doms[:20], node)
        np.testing.assert_array_equal(doms[20:], 1 - node)
    mixed = Traffic(mixes=((0.5, 0.5),), requests_per_node=400, tokens_per_request=(1, 1))
    share = generate(PRESETS["mixtral-8x7b"], mixed, seed=0).domain.mean()
    assert 0.42 < share < 0.58


def test_mixing_domains_flattens_skew() -> None:
    """FACTS.md: mixing domains at one node flattens the skew (node-level usage closer to uniform)."""
    shape = PRESETS["deepseek-v2-lite"]
    pure = generate(shape, Traffic.dedicated(2, 2, 30), seed=3).counts()
    mixed = generate(shape, Traffic.dedicated(2, 2, 30, purity=0.5), seed=3).counts()
    top = lambda f: float(np.sort(f / f.sum(-1, keepdims=True), axis=-1)[..., -16:].sum(-1).mean())  # noqa: E731
    assert top(mixed) < top(pure) - 0.03


@pytest.mark.parametrize(
    "traffic",
    [
        Traffic(mixes=((0.5, 0.6),), requests_per_node=1),
        Traffic(mixes=((1.0,),), requests_per_node=0),
        Traffic(mixes=((1.0,),), requests_per_node=1, tokens_per_request=(5, 2)),
        Traffic(mixes=((1.0, 0.0),), requests_per_node=1, shifts=(Shift(3, 0, (0.0, 1.0)),)),
    ],
)
def test_bad_traffic(traffic: Traffic) -> None:
    with pytest.raises(InvalidInputError):
        generate(PRESETS["mixtral-8x7b"], traffic)
