"""Activation counting and the report's wire format."""

from __future__ import annotations

import numpy as np
import pytest

from shared.activations import ActivationCounter, ActivationReport
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
