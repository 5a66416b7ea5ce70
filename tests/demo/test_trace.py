"""`prism trace` on the shipped demo model: the routing trace round-trips, matches the requests,
and the same command gives the same file contents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from cli.trace import TraceSettings, record_trace
from services.placement.traces import ARRAYS, RoutingTrace
from shared.workloads import Workloads

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


def _run(args: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(args)
    code = done.value.code
    assert isinstance(code, int)
    return code


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trace") / "t.npz"
    code = _run(["trace", "--model", str(DEMO), "--scenario", "switch-3-short", "--out", str(out),
                 "--requests", "3", "--max-tokens", "5", "--seed", "4"])
    assert code == 0
    return out


def test_trace_round_trips_and_tags_every_token(traced: Path, tmp_path: Path) -> None:
    trace = RoutingTrace.load(traced)
    meta = trace.meta
    assert meta.nodes == ("node0", "node1", "node2")
    assert meta.domains == Workloads.load().domains
    assert (meta.num_experts, meta.top_k, meta.moe_layers) == (32, 2, (0, 1, 2, 3))
    assert (meta.extra["scenario"], meta.extra["seed"]) == ("switch-3-short", 4)
    # 9 requests: each is its prompt plus up to 4 fed-back generated tokens, positions 0..n-1
    assert sorted(set(trace.request.tolist())) == list(range(9))
    for rid in range(9):
        pos = trace.position[trace.request == rid]
        assert sorted(pos.tolist()) == list(range(len(pos)))
        assert len(set(trace.domain[trace.request == rid].tolist())) == 1
    assert np.all(trace.weights[..., 0] >= trace.weights[..., 1])  # top-k by descending weight
    assert np.allclose(trace.weights.astype(np.float32).sum(-1), 1.0, atol=2e-3)  # Mixtral renormalises
    counts = trace.counts()
    assert counts.shape == (3, 4, 32)
    assert np.array_equal(counts.sum(axis=(0, 2)), np.full(4, 2.0 * trace.num_tokens))
    trace.save(tmp_path / "again.npz")
    again = RoutingTrace.load(tmp_path / "again.npz")
    for name in ARRAYS:
        assert np.array_equal(getattr(again, name), getattr(trace, name))
    assert again.meta == trace.meta


def test_the_first_request_of_each_node_has_its_scenario_domain(traced: Path) -> None:
    trace = RoutingTrace.load(traced)
    requests = Workloads.load().requests("switch-3-short", 3, seed=4)
    for rid, request in enumerate(requests):
        tokens = trace.request == rid
        assert set(trace.node[tokens].tolist()) == {request.node}
        assert trace.meta.domains[int(trace.domain[tokens][0])] == request.domain


def test_same_settings_give_the_same_trace(traced: Path) -> None:
    workloads = Workloads.load()
    requests = workloads.requests("switch-3-short", 3, seed=4)
    settings = TraceSettings(max_tokens=5, temperature=0.8, seed=4, batch=8)
    fresh = record_trace(DEMO, requests, workloads.domains, ("node0", "node1", "node2"), settings=settings)
    saved = RoutingTrace.load(traced)
    for name in ARRAYS:
        assert np.array_equal(getattr(fresh, name), getattr(saved, name)), name


def test_unknown_scenario_fails_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _run(["trace", "--model", str(DEMO), "--scenario", "nope", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert code == 1
    assert "unknown scenario 'nope'" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.npz").exists()
