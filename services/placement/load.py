"""The traffic the latency model is told about, measured while serving.

The `latency` and `route` policies and the migration rule price a step with a `Workload`: each home's
batch, its steps per second (the load it brings to the nodes on its route: what `route` rehearses),
the steps a request takes, the dense part of a layer and one expert invocation. The simulator knows
them; a live cluster measures them, over the last `horizon_s` (PlacementSettings.load_horizon_s: long
enough for a steady rate, short enough to follow the day's traffic):
- each gating's activation reports carry its own steps (`shared.activations.StepLoad`): their number,
  the sequences in them, the seconds of dense compute over the MoE layers they ran, and the requests
  that finished; a node's step rate is over the time since its first report in the horizon began
  (traffic that started a moment ago counts at its own rate), the steps of a request are all nodes'
  sequences over their finished requests;
- each host's heartbeat carries cumulative expert calls and the seconds spent on them (embedded calls'
  compute; messages answered, from decoding to the reply).
Times are the Workload's, on a speed-1.0 host: a host's seconds are scaled by the speed it reports (its
topology's), a node's dense seconds by its first host's.
A field nothing measured yet keeps the Workload's default (batch 1, no step rate, no dense time, the
default expert time, the rehearsal's request length): what the service planned with before it measured
anything.

Without them `route` priced Mixtral's testbed at batch 8 as if every peer were idle and its experts
cost 40 µs: it chose routes up to 2.7× slower than with the measured workload (`bench/calibration.py`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from services.placement.types import Workload
from shared.activations import StepLoad
from shared.schemas import HostStatus


@dataclass(frozen=True)
class Measured:
    """What `LoadTracker` measured, for the serving nodes asked about; None where nothing was."""

    batch: np.ndarray  # [N] int >= 1: mean sequences per step (1 where a node ran no step)
    step_rate: np.ndarray | None  # [N] steps per second
    dense_time_s: float | None  # the dense part of one layer of one step
    expert_time_s: float | None  # one expert invocation
    tokens_per_request: float | None = None  # steps a request takes (its tokens)

    def workload(self, **fixed: Any) -> Workload:
        """A Workload of these measurements and `fixed` fields; an unmeasured one keeps its default."""
        workload = Workload(batch=self.batch, step_rate=self.step_rate, tokens_per_request=self.tokens_per_request,
                            **fixed)
        if self.dense_time_s is not None:
            workload = replace(workload, dense_time_s=self.dense_time_s)
        if self.expert_time_s is not None:
            workload = replace(workload, expert_time_s=self.expert_time_s)
        return workload


def first_host_speeds(statuses: Iterable[HostStatus], nodes: list[str]) -> np.ndarray:
    """[len(nodes)] the speed of each node's first host by name, where the route model runs a node's
    dense part (1.0 for a node without a live host)."""
    first: dict[str, float] = {}
    for status in sorted(statuses, key=lambda s: s.host):
        first.setdefault(status.node, status.speed)
    return np.array([first.get(node, 1.0) for node in nodes])


class LoadTracker:
    """Gatings' step loads and hosts' expert-call counters over a sliding horizon."""

    def __init__(self, num_nodes: int, horizon_s: float = 60.0) -> None:
        self.num_nodes = num_nodes
        self.horizon_s = horizon_s
        self._steps: deque[tuple[float, int, StepLoad]] = deque()  # (window start, node, its report's load)
        self._calls: deque[tuple[float, int, float]] = deque()  # (when, expert calls, their seconds)
        self._counters: dict[str, tuple[str, int, float]] = {}  # host -> (instance, calls, seconds) last seen

    def add_steps(self, node: int, load: StepLoad, window_s: float, now: float | None = None) -> None:
        """A report's steps, over the `window_s` before `now`."""
        if load.steps:
            self._steps.append(((time.monotonic() if now is None else now) - window_s, node, load))

    def add_host(self, status: HostStatus, now: float | None = None) -> None:
        """A heartbeat: the calls and seconds since this host's last one (none across a restart)."""
        calls = status.calls_served + status.direct_calls
        seconds = (status.busy_s + status.direct_s) * status.speed  # as on a speed-1.0 host
        last = self._counters.get(status.host)
        self._counters[status.host] = (status.instance, calls, seconds)
        if last is None or last[0] != status.instance or calls < last[1] or seconds < last[2]:
            return  # a first heartbeat or a restarted host: its counters are a new baseline
        if calls > last[1]:
            self._calls.append((time.monotonic() if now is None else now, calls - last[1], seconds - last[2]))

    def measured(self, rows: list[int], now: float | None = None, speeds: np.ndarray | None = None) -> Measured:
        """The measurements for nodes `rows` (indices into the tracker's nodes), in that order; `speeds`
        [len(rows)]: each node's first host's speed, where its gating computes (default 1.0)."""
        now = time.monotonic() if now is None else now
        self._forget(now)
        steps, sequences, dense_s, layers, finished = (np.zeros(self.num_nodes) for _ in range(5))
        since = np.full(self.num_nodes, now)  # the start of each node's oldest window kept
        for start, node, load in self._steps:
            since[node] = min(since[node], start)
            steps[node] += load.steps
            sequences[node] += load.sequences
            dense_s[node] += load.dense_s
            layers[node] += load.dense_layers
            finished[node] += load.finished
        steps, sequences, finished = steps[rows], sequences[rows], finished[rows]
        batch = np.maximum(np.round(np.divide(sequences, steps, out=np.ones_like(steps), where=steps > 0)), 1)
        # a node's rate over the time since its first step in the horizon: traffic that began a moment
        # ago runs at its own rate, not spread over a minute of idling before it
        span = now - since[rows]
        rate = np.divide(steps, span, out=np.zeros_like(steps), where=span > 0) if steps.any() else None
        speed = np.ones(len(rows)) if speeds is None else np.asarray(speeds, dtype=np.float64)
        dense = float((dense_s[rows] * speed).sum() / layers[rows].sum()) if layers[rows].sum() > 0 else None
        calls = sum(c for _, c, _ in self._calls)
        expert = sum(s for _, _, s in self._calls) / calls if calls else None
        per_request = max(float(sequences.sum() / finished.sum()), 1.0) if finished.sum() > 0 else None
        return Measured(batch.astype(np.int64), rate, dense, expert, per_request)

    def _forget(self, now: float) -> None:
        horizon = now - self.horizon_s
        for window in (self._steps, self._calls):
            while window and window[0][0] < horizon:
                window.popleft()
