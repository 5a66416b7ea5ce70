"""Activation counting and the report's wire format."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from shared.activations import ActivationCounter, ActivationReport, StepLoad
from shared.errors import BadTensor


def test_counter_accumulates_per_layer_and_resets_on_take() -> None:
    counter = ActivationCounter("edge-a", layers=[1, 3], num_experts=4)
    counter.add(3, [0, 2], [5, 1], tokens=3)
    counter.add(3, [2], [2], tokens=2)
    counter.add(1, [], [], tokens=0)  # a call whose tokens had all failed already
    report = counter.take(window_s=2.0)
    assert report.counts.tolist() == [[0, 0, 0, 0], [5, 0, 3, 0]]
    assert report.tokens.tolist() == [0, 5]
    assert counter.take(window_s=2.0).counts.sum() == 0


def test_report_round_trips_and_rejects_garbage() -> None:
    counts = np.arange(8, dtype=np.int64).reshape(2, 4)
    report = ActivationReport("edge-b", 1.5, [0, 2], counts, np.array([3, 4], dtype=np.int64))
    back = ActivationReport.decode(report.encode())
    assert (back.node, back.window_s, back.layers) == ("edge-b", 1.5, [0, 2])
    assert np.array_equal(back.counts, counts)
    assert back.tokens.tolist() == [3, 4]
    with pytest.raises(BadTensor):
        ActivationReport.decode(b"\x81\xa1v\x01")


@pytest.mark.parametrize(
    ("largest", "dtype"), [(0, "<u1"), (255, "<u1"), (256, "<u2"), (70_000, "<u4"), (2**40, "<i8")]
)
def test_counts_travel_in_the_smallest_type_that_holds_them(largest: int, dtype: str) -> None:
    counts = np.zeros((26, 64), dtype=np.int64)
    counts[3, 7], counts[25, 63] = largest, 1
    report = ActivationReport("edge-a", 2.0, list(range(1, 27)), counts, np.full(26, 5, dtype=np.int64))
    payload = report.encode()
    assert msgpack.unpackb(payload)["count_dtype"] == dtype
    back = ActivationReport.decode(payload)
    assert back.counts.dtype == np.int64
    assert np.array_equal(back.counts, counts)
    if dtype == "<u1":  # DeepSeek-V2-Lite's 26 x 64 counts: a byte each, where int64 took 13.3 kB
        assert len(payload) < 26 * 64 + 400


def test_a_bad_count_type_or_a_negative_count_is_refused() -> None:
    report = ActivationReport("edge-a", 1.0, [0], np.array([[1, 2]], dtype=np.int64), np.array([3], dtype=np.int64))
    data = msgpack.unpackb(report.encode())
    negative = {"count_dtype": "<i8", "counts": np.array([-1, 2], dtype="<i8").tobytes()}
    for bad in ({"count_dtype": "<f4"}, {"count_dtype": "<u2"}, negative):
        with pytest.raises(BadTensor):
            ActivationReport.decode(msgpack.packb({**data, **bad}))


def test_the_step_load_travels_with_the_report() -> None:
    counter = ActivationCounter("edge-a", layers=[1], num_experts=2)
    load = StepLoad()
    load.add(3, 0.002, 4)
    load.add(1, 0.001, 4)
    load.finished += 2
    report = counter.take(1.0, load.take())
    back = ActivationReport.decode(report.encode())
    assert back.load == StepLoad(steps=2, sequences=4, dense_s=0.003, dense_layers=8, finished=2)
    assert load.take() == StepLoad(), "take starts a new window"


def test_a_report_without_a_load_has_none_and_a_bad_load_is_refused() -> None:
    old = msgpack.packb({"v": 1, "node": "edge-a", "window_s": 1.0, "layers": [0], "num_experts": 2,
                         "counts": np.zeros(2, dtype="<i8").tobytes(), "tokens": np.zeros(1, dtype="<i8").tobytes()})
    assert ActivationReport.decode(old).load == StepLoad()  # a gating of an older version
    for bad in ({"steps": -1}, {"dense_s": float("nan")}, {"step_sequences": "many"}, {"finished": -3}):
        payload = msgpack.packb({**msgpack.unpackb(old), **bad})
        with pytest.raises(BadTensor):
            ActivationReport.decode(payload)
