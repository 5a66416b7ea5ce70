"""A rehearsal: a short run of the simulator for one layout, on the traffic the planner was told about.

Why: the `route` policy's load view estimated how long a home's step waits for the other homes' work
with processor sharing on every host it uses (`route_model.queueing_delay`). Along routes that is
the wrong shape of wait: a node runs other homes' segments one batch at a time, batches segments of
one layer range that wait together, and a pipeline's first stage spaces the steps out for the stages
after it. On the DeepSeek-V2-Lite testbed at 0.2 ms round trips the simulator measured steps waiting
0.1-1.8 ms where processor sharing said 2.0-2.4 ms, and it ranked the layouts the other way round
(docs/benchmarks.md). A rehearsal replaces the estimate with the simulator itself, on a small sample.

Traffic: requests of T tokens (`Workload.tokens_per_request`, measured; TOKENS where it is not) arrive
at home h as a Poisson process at step_rate[h] · B_h / T per second (`Workload.step_rate`,
`Workload.batch`), so that h runs its measured steps per second at its measured batch, over a horizon
of REHEARSAL_REQUESTS requests at the mean rate (MAX_STEPS steps at most); a token's experts are rows
of h's sampled top-k sets (`LatencyModel.samples`, taken in turn). The gatings batch continuously (up
to the largest B_h), so a request that finds its home busy waits, as it would. Requests, not single
steps: a home runs the steps of a request back to back, and homes sharing a pipeline fall into step
with one another; Poisson steps rehearsed the DeepSeek case above the wrong way round again. Timing
is the Workload's (the dense part of a layer at the home's batch, one expert invocation and its
per-token time) on the cluster's hosts, speeds and links. Every layout rehearsed for one model gets
the same arrivals and rows (common random numbers), so the difference between two layouts is not
noise of the draw. What is left is the noise of the sample: over 25 requests per home one testbed
cell of 24 kept the pipeline where 32 and 50 found a layout 4.6% faster (docs/benchmarks.md).

Measure: per home the mean latency of its requests over their T tokens, seconds per token with
every wait included, weighted like the model's other views (`LatencyModel.weight`). Pure numpy; nothing
here imports nats.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from services.placement.latency_model import LatencyModel
from services.placement.simulator import SimConfig, simulate
from services.placement.traces import RoutingTrace, TraceMeta
from services.placement.types import Placement

REHEARSAL_REQUESTS = 32  # requests per home at the mean step rate: the measure's noise is the requests'
MAX_STEPS = 4000  # decode steps per home at most (long requests are rehearsed over fewer of them)
TOKENS = 32  # tokens per rehearsed request where the workload does not say
SEED = 0


class Rehearsal:
    """The traffic of one (cluster, samples, workload), rehearsed on any number of layouts."""

    def __init__(self, model: LatencyModel) -> None:
        """The traffic `model` was told about: its cluster, each home's sampled rows (`samples`), its
        workload's batch and step rates (required), its weights for `cost`."""
        if model.workload.step_rate is None:
            raise ValueError("a rehearsal needs the homes' step rates")
        self.cluster, self.coact, self.samples = model.cluster, model.coact, model.samples
        self.workload = model.workload
        self.weight, self.num_experts = model.weight, int(model.p.shape[2])
        per_request = model.workload.tokens_per_request
        self.tokens = TOKENS if per_request is None else max(1, round(per_request))  # per rehearsed request

    @cached_property
    def traffic(self) -> tuple[RoutingTrace, list[np.ndarray]]:
        """(trace of the requests, per home their arrival times), see the module docstring."""
        wl, n_nodes = self.workload, self.cluster.num_nodes
        rate = np.asarray(wl.step_rate, dtype=np.float64)
        busy = rate > 0
        steps = min(REHEARSAL_REQUESTS * self.tokens, MAX_STEPS)
        horizon = steps / float(rate[busy].mean()) if busy.any() else 0.0
        rng = np.random.default_rng(SEED)
        experts, node, request, arrivals = [], [], [], []
        first = 0
        for h in range(n_nodes):
            rows = self.coact.sets[h][self.samples[h]]  # [S, L, K]
            starts = _poisson(rng, float(rate[h] * wl.batch[h]) / self.tokens, horizon) if rows.size else np.zeros(0)
            take = np.arange(starts.size * self.tokens) % max(rows.shape[0], 1)
            experts.append(rows[take])
            node.append(np.full(take.size, h))
            request.append(np.repeat(np.arange(starts.size) + first, self.tokens))
            first += starts.size
            arrivals.append(starts)
        exp = np.concatenate(experts)
        count = exp.shape[0]
        meta = TraceMeta(model="rehearsal", moe_layers=tuple(range(exp.shape[1])),
                         num_experts=self.num_experts, top_k=exp.shape[2],
                         hidden_size=max(1, round(wl.bytes_per_token)), domains=("rehearsal",),
                         nodes=tuple(str(n) for n in range(n_nodes)), bytes_per_element=1)
        trace = RoutingTrace(experts=exp, weights=np.zeros(exp.shape), node=np.concatenate(node),
                             domain=np.zeros(count, dtype=np.int64), request=np.concatenate(request),
                             position=np.arange(count) % self.tokens, meta=meta)
        return trace, arrivals

    @cached_property
    def config(self) -> SimConfig:
        wl = self.workload
        return SimConfig(max_batch=int(wl.batch.max()), dense_time_s=wl.dense_time_s, dense_time_per_token_s=0.0,
                         expert_time_s=wl.expert_time_s, expert_time_per_token_s=wl.expert_time_per_token_s,
                         seed=SEED)

    def token_times(self, placement: Placement) -> np.ndarray:
        """[N_home] each home's mean request latency under `placement` over its `tokens`: seconds
        per token, its waits included (0: a home without traffic)."""
        trace, arrivals = self.traffic
        n_nodes = self.cluster.num_nodes
        if trace.num_tokens == 0:
            return np.zeros(n_nodes)
        result = simulate(trace, self.cluster, placement, self.config, arrivals=arrivals)
        total = np.bincount(result.request_node, weights=result.latencies_s, minlength=n_nodes)
        count = np.bincount(result.request_node, minlength=n_nodes)
        return np.divide(total, count * self.tokens, out=np.zeros(n_nodes), where=count > 0)

    def cost(self, placement: Placement) -> float:
        """Σ_h w_h · home h's seconds per token (`token_times`)."""
        return float(self.weight @ self.token_times(placement))


def _poisson(rng: np.random.Generator, rate: float, horizon: float) -> np.ndarray:
    """Arrival times of a Poisson process of `rate` on [0, horizon)."""
    if rate <= 0 or horizon <= 0:
        return np.zeros(0)
    gaps = rng.exponential(1.0 / rate, size=int(rate * horizon * 1.5) + 16)
    at = np.cumsum(gaps)
    return at[at < horizon]
