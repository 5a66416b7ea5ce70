"""`route` on held-out shapes, judged by bench/route_grid.py's per-step model (which shares no code with
the project's latency models): never above min(pipeline, best stay-home) by more than the judge's noise.
The cells are ones where `route`, choosing on its every-home-at-once cost, stayed home although the
pipeline was 10–47% faster per step, and one where `latency`'s stay-home pick was slower than `eplb`'s."""

from __future__ import annotations

import numpy as np
import pytest

from bench.route_grid import cell


@pytest.mark.parametrize(
    ("model", "share", "gpus", "rtt_ms", "batch"),
    [
        ("mixtral-8x7b", 0.5, (1, 1, 1), 4.0, 8),  # was 1.47× the pipeline
        ("mixtral-8x7b", 0.5, (1, 1, 2), 1.0, 1),  # 1.26×
        ("deepseek-v2-lite", 0.5, (1, 1, 1), 0.2, 8),  # 1.13×
        ("deepseek-v2-lite", 0.7, (1, 1, 2), 0.2, 1),  # 1.10×
        ("mixtral-8x7b", 0.9, (1, 1, 1), 1.0, 8),  # 1.03× eplb's, before eplb's placement was a candidate
    ],
)
def test_route_not_above_its_baselines_in_an_independent_step_model(
    model: str, share: float, gpus: tuple[int, ...], rtt_ms: float, batch: int
) -> None:
    c = cell(model, share, gpus, rtt_ms=rtt_ms, batch=batch, samples=12)
    assert c["route"] <= min(c["home"], c["pipeline"]) * 1.01, c


def test_route_not_above_its_baselines_where_the_load_view_flatters_holding_both_experts() -> None:
    """`bench/route_grid.py --random 60 --seed 0`, cell 5: Mixtral at batch 1 on 1/1/2 GPUs, 0.5 ms,
    2000 Mbit/s, unequal memory. On expected work a layer with both experts local looked cheaper than
    the 2-GPU node running half the layers for everyone (judged 8.7% above the pipeline); the row view
    rules that out (`route_model.replaces`)."""
    share = np.array([0.4978, 0.2806, 0.2120, 0.3474])
    c = cell("mixtral-8x7b", share, (1, 1, 2), rtt_ms=0.5, batch=1, samples=12, mbit=2000.0, purity=0.9,
             dense=True, seed=5)
    assert c["route"] <= min(c["home"], c["pipeline"]) * 1.01, c


def test_route_not_above_its_baselines_above_the_load_views_node_count() -> None:
    """17 nodes, above `LOAD_VIEW_MAX_NODES`: `route` chose on the every-home-at-once cost there, which
    charges a node that runs layers for many homes all their work at once, and stayed home at 2.05× the
    pipeline; it chooses on the row view now (one evaluation for every home)."""
    c = cell("deepseek-v2-lite", 1.5 / 17, (1,) * 17, rtt_ms=8.0, batch=8, samples=8)
    assert c["route"] <= min(c["home"], c["pipeline"]) * 1.01, c
