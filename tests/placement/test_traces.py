"""RoutingTrace: save/load round trip, validation errors, counts and co-activation helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.placement.traces import RoutingTrace, TraceFormatError, TraceMeta


def _meta(**kw: object) -> TraceMeta:
    base: dict[str, object] = {
        "model": "tiny", "moe_layers": (1, 2), "num_experts": 4, "top_k": 2, "hidden_size": 8,
        "domains": ("code", "prose"), "nodes": ("a", "b"),
    }
    base.update(kw)
    return TraceMeta(**base)  # type: ignore[arg-type]


def _trace() -> RoutingTrace:
    # 3 tokens: two of request 0 on node 0, one of request 1 on node 1.
    experts = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]], [[3, 0], [0, 1]]])
    return RoutingTrace(
        experts=experts, weights=np.full(experts.shape, 0.5), node=np.array([0, 0, 1]),
        domain=np.array([0, 0, 1]), request=np.array([0, 0, 1]), position=np.array([0, 1, 0]), meta=_meta(),
    )


def test_counts_by_hand() -> None:
    f = _trace().counts()
    assert f.shape == (2, 2, 4)
    np.testing.assert_array_equal(f[0, 0], [2, 1, 1, 0])
    np.testing.assert_array_equal(f[0, 1], [0, 1, 2, 1])
    np.testing.assert_array_equal(f[1, 0], [1, 0, 0, 1])
    np.testing.assert_array_equal(f[1, 1], [1, 1, 0, 0])
    assert f.sum() == 3 * 2 * 2
    # more nodes than the trace names: zero rows
    assert _trace().counts(3)[2].sum() == 0


def test_round_trip(tmp_path: Path) -> None:
    t = _trace()
    assert t.save(tmp_path / "t.npz") == tmp_path / "t.npz"
    assert t.save(tmp_path / "t.txt") == tmp_path / "t.txt.npz"  # the path numpy really writes
    u = RoutingTrace.load(tmp_path / "t.npz")
    assert u.meta == t.meta
    for name in ("experts", "weights", "node", "domain", "request", "position"):
        np.testing.assert_array_equal(getattr(u, name), getattr(t, name))
    assert u.experts.dtype == np.int16
    assert u.weights.dtype == np.float16
    assert u.request.dtype == np.int32
    assert u.meta.bytes_per_token == 16


def test_extra_meta_keys_survive(tmp_path: Path) -> None:
    t = _trace()
    t2 = RoutingTrace(**{k: getattr(t, k) for k in ("experts", "weights", "node", "domain", "request", "position")},
                      meta=_meta(extra={"seed": 3}))
    t2.save(tmp_path / "t.npz")
    assert RoutingTrace.load(tmp_path / "t.npz").meta.extra == {"seed": 3}


def test_pair_counts_and_coactivation() -> None:
    t = _trace()
    pc = t.pair_counts()
    assert pc.shape == (2, 2, 4, 4)
    np.testing.assert_array_equal(np.diagonal(pc, axis1=2, axis2=3), t.counts())
    np.testing.assert_array_equal(pc, np.swapaxes(pc, 2, 3))
    assert pc[0, 0, 0, 1] == 1
    assert pc[0, 0, 0, 2] == 1
    assert pc[0, 1, 2, 3] == 1
    co = t.coactivation(samples_per_node=4)
    assert co.sets.shape == (2, 4, 2, 2)
    np.testing.assert_array_equal(co.tokens, [[2, 2], [1, 1]])
    np.testing.assert_array_equal(co.valid, [[True, True, False, False], [True, False, False, False]])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"experts": np.array([[[0, 4], [2, 3]]] * 3)}, "experts must lie in"),
        ({"experts": np.array([[[1, 1], [2, 3]]] * 3)}, "same expert twice"),
        ({"node": np.array([0, 0, 2])}, "node must lie in"),
        ({"node": np.array([0, 1, 1])}, "one request must belong to one node"),
        ({"position": np.array([0, -1, 0])}, ">= 0"),
        ({"weights": np.zeros((3, 2, 3))}, "weights has shape"),
        ({"domain": np.array([0, 0])}, "domain must have shape"),
        ({"experts": np.zeros((3, 2, 2), dtype=float)}, "must hold integers"),
    ],
)
def test_validation(change: dict[str, np.ndarray], message: str) -> None:
    t = _trace()
    fields = {k: getattr(t, k) for k in ("experts", "weights", "node", "domain", "request", "position")}
    fields.update(change)
    with pytest.raises(TraceFormatError, match=message):
        RoutingTrace(meta=t.meta, **fields)


def test_meta_mismatch() -> None:
    t = _trace()
    fields = {k: getattr(t, k) for k in ("experts", "weights", "node", "domain", "request", "position")}
    with pytest.raises(TraceFormatError, match="meta says 3 MoE layers"):
        RoutingTrace(meta=_meta(moe_layers=(1, 2, 3)), **fields)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="no trace file"):
        RoutingTrace.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceFormatError, match="not a readable"):
        RoutingTrace.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "partial.npz", experts=np.zeros((1, 1, 1)))
    with pytest.raises(TraceFormatError, match="lacks arrays"):
        RoutingTrace.load(tmp_path / "partial.npz")
    t = _trace()
    arrays = {k: getattr(t, k) for k in ("experts", "weights", "node", "domain", "request", "position")}
    np.savez(tmp_path / "badmeta.npz", meta=np.array("{not json"), **arrays)
    with pytest.raises(TraceFormatError, match="not valid JSON"):
        RoutingTrace.load(tmp_path / "badmeta.npz")
    np.savez(tmp_path / "nokeys.npz", meta=np.array('{"model": "x"}'), **arrays)
    with pytest.raises(TraceFormatError, match="lacks"):
        RoutingTrace.load(tmp_path / "nokeys.npz")
