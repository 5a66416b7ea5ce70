"""What the placement service measures about the traffic (services/placement/load.py), by hand."""

from __future__ import annotations

import numpy as np
import pytest

from services.placement.load import LoadTracker, first_host_speeds
from services.placement.types import Workload
from shared.activations import StepLoad
from shared.schemas import HostStatus


def heartbeat(host: str, calls: int, seconds: float, *, direct: tuple[int, float] = (0, 0.0),
              instance: str = "i1") -> HostStatus:
    return HostStatus(host=host, node="n0", device="cpu", memory_used_bytes=0, memory_limit_bytes=1, experts=[],
                      queue_depth=0, calls_served=calls, tokens_served=calls, errors=0, busy_s=seconds,
                      direct_calls=direct[0], direct_s=direct[1], instance=instance)


def test_nothing_measured_keeps_the_defaults() -> None:
    wl, default = LoadTracker(2).measured([0, 1], now=10.0).workload(top_k=2), Workload.uniform(2, top_k=2)
    assert wl.batch.tolist() == default.batch.tolist() == [1, 1]
    assert (wl.step_rate, wl.dense_time_s, wl.expert_time_s) == (None, default.dense_time_s, default.expert_time_s)
    assert wl.tokens_per_request is None


def test_batch_rate_and_dense_time_from_the_gatings_steps() -> None:
    tracker = LoadTracker(3, horizon_s=60.0)
    for t in (1.0, 2.0, 3.0, 4.0):  # node 0: 20 steps of 3 sequences a second, 2 ms dense over 4 layers each
        tracker.add_steps(0, StepLoad(steps=20, sequences=60, dense_s=20 * 0.002, dense_layers=20 * 4, finished=3),
                          1.0, now=t)
    tracker.add_steps(2, StepLoad(steps=10, sequences=14, dense_s=10 * 0.001, dense_layers=10 * 2, finished=1),
                      2.0, now=4.0)
    tracker.add_steps(1, StepLoad(), 1.0, now=4.0)  # a window without steps: nothing
    measured = tracker.measured([0, 1, 2], now=5.0)
    assert measured.batch.tolist() == [3, 1, 1]  # 14 / 10 rounds to 1; no steps: 1
    assert measured.step_rate == pytest.approx([80 / 5, 0, 10 / 3]), "steps since each node's first window began"
    assert measured.dense_time_s == pytest.approx((80 * 0.002 + 10 * 0.001) / (80 * 4 + 10 * 2))
    assert measured.tokens_per_request == pytest.approx((4 * 60 + 14) / (4 * 3 + 1)), "sequences per finished request"
    assert measured.workload().tokens_per_request == measured.tokens_per_request
    only = tracker.measured([2], now=5.0)  # the serving nodes alone
    assert only.batch.tolist() == [1]
    assert only.dense_time_s == pytest.approx(0.0005)
    assert tracker.measured([0], now=70.0).step_rate is None, "the steps left the 60 s horizon"


def test_a_rate_is_over_the_horizon_or_since_the_traffic_began() -> None:
    tracker = LoadTracker(2, horizon_s=10.0)
    for t in range(1, 100):  # node 0: 4 steps a second for 99 s
        tracker.add_steps(0, StepLoad(steps=4, sequences=4, dense_s=0.0, dense_layers=0), 1.0, now=float(t))
    tracker.add_steps(1, StepLoad(steps=6, sequences=6, dense_s=0.0, dense_layers=0), 1.0, now=98.0)
    tracker.add_steps(1, StepLoad(steps=6, sequences=6, dense_s=0.0, dense_layers=0), 1.0, now=99.0)
    measured = tracker.measured([0, 1], now=99.0)
    # node 0: the 10 windows that began in the last 10 s; node 1 began 2 s ago: 6 a second, not 12 over 10 s
    assert measured.step_rate == pytest.approx([40 / 10, 12 / 2])
    assert measured.dense_time_s is None


def test_expert_time_from_the_hosts_counters_across_restarts() -> None:
    tracker = LoadTracker(1)
    tracker.add_host(heartbeat("h0", 100, 9.0), now=1.0)  # a baseline, whatever ran before
    tracker.add_host(heartbeat("h0", 300, 9.1, direct=(100, 0.02)), now=2.0)  # 300 calls in 0.12 s
    tracker.add_host(heartbeat("h1", 0, 0.0), now=2.0)
    tracker.add_host(heartbeat("h1", 100, 0.08), now=3.0)  # 100 in 0.08 s
    tracker.add_host(heartbeat("h1", 10, 0.01, instance="i2"), now=4.0)  # restarted: a new baseline
    tracker.add_host(heartbeat("h1", 10, 0.01, instance="i2"), now=5.0)  # idle: nothing
    assert tracker.measured([0], now=6.0).expert_time_s == pytest.approx(0.2 / 400)
    assert tracker.measured([0], now=70.0).expert_time_s is None, "older than the horizon"


def test_the_workload_carries_what_was_measured() -> None:
    tracker = LoadTracker(2)
    tracker.add_steps(1, StepLoad(steps=50, sequences=400, dense_s=0.5, dense_layers=500), 10.0, now=10.0)
    tracker.add_host(heartbeat("h0", 0, 0.0), now=1.0)
    tracker.add_host(heartbeat("h0", 10, 0.005), now=2.0)
    wl = tracker.measured([0, 1], now=10.0).workload(top_k=2, min_gain=0.05)
    assert wl.batch.tolist() == [1, 8]
    assert wl.step_rate is not None
    assert wl.step_rate.tolist() == [0.0, 5.0]
    assert (wl.dense_time_s, wl.expert_time_s, wl.top_k, wl.min_gain) == (pytest.approx(0.001), 0.0005, 2, 0.05)
    assert np.isfinite(wl.step_rate).all()


def test_a_nodes_speed_is_its_first_hosts_by_name() -> None:
    hosts = [heartbeat("b-gpu1", 0, 0.0), heartbeat("b-gpu0", 0, 0.0), heartbeat("a-gpu0", 0, 0.0)]
    hosts = [h.model_copy(update={"node": h.host[0], "speed": s}) for h, s in zip(hosts, (2.0, 0.5, 3.0), strict=True)]
    assert first_host_speeds(hosts, ["a", "b", "c"]).tolist() == [3.0, 0.5, 1.0]
