"""Every Prometheus metric Prism exports, in one place: names, help, labels, buckets (`SPECS`).

Conventions (Prometheus naming, as vLLM's metrics): base units (`_seconds`, `_bytes`), counters end in
`_total`, latencies are histograms, labels are bounded sets — node, host, locality, direction, kind,
result, stage — never request ids. Each service process has its own `CollectorRegistry` (never the
global one), so several services in one process (tests, a gating with embedded hosts) do not clash.

Two ways a value gets here:
- observed when it happens: `RequestMetrics` (a gating's finished requests) and `MigrationMetrics`
  (the migrator's steps and epochs) hold prometheus_client counters and histograms;
- read when scraped: the collectors below read a component's own counters (`GatingCollector`,
  `HostsCollector`, `ConnectionCollector`, `PlacementCollector`) through a callable, so the hot path
  of a service keeps its plain integer counters and pays nothing for metrics.

A registry is scraped on the service's event loop (shared/metrics_http.py), so collectors read state
the loop owns without locks. Pure: nothing here imports nats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.schemas import HostStatus

# `<name>_created` series double every counter and histogram; nothing here reads them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

Kind = Literal["counter", "gauge", "histogram"]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)  # seconds, whole requests
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds
MIGRATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)  # seconds


@dataclass(frozen=True)
class Spec:
    """One metric: its exposed name (counters with `_total`), type, help text, label names."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def family(self) -> str:
        """The family name prometheus_client wants (a counter's without `_total`)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


# ---- gating (one per node) -------------------------------------------------------------------------
REQUESTS = Spec("prism_requests_total", "counter",
                "requests answered, by result: the finish reason (stop, length) or the error code", ("node", "result"))
REQUEST_SECONDS = Spec("prism_request_seconds", "histogram",
                       "arrival at the gating to the last token, seconds, of requests that finished",
                       ("node",), LATENCY_BUCKETS)
FIRST_TOKEN_SECONDS = Spec("prism_time_to_first_token_seconds", "histogram",
                           "arrival at the gating to the first generated token, seconds", ("node",),
                           FIRST_TOKEN_BUCKETS)
PER_TOKEN_SECONDS = Spec("prism_time_per_output_token_seconds", "histogram",
                         "first to last token over the tokens after the first, seconds (requests of >= 2 tokens)",
                         ("node",), PER_TOKEN_BUCKETS)
TOKENS = Spec("prism_tokens_total", "counter",
              "tokens of finished requests: kind=prompt (their usage.prompt_tokens), generated (completion_tokens)",
              ("node", "kind"))
EXPERT_CALLS = Spec("prism_expert_calls_total", "counter",
                    "expert calls of this node's steps: local = computed in the gating's process or sent to a host "
                    "on this node (its heartbeats say so); remote = sent to a host of another node, or to an "
                    "expert's subject where the bus picks the holder", ("node", "locality"))
EXPERT_MESSAGES = Spec("prism_expert_messages_total", "counter", "expert-call messages sent over NATS", ("node",))
QUEUE_DEPTH = Spec("prism_queue_depth", "gauge", "requests waiting for a batch slot", ("node",))
RUNNING = Spec("prism_running_requests", "gauge", "requests in the batch (decoding together)", ("node",))
ROUTE_HOPS = Spec("prism_route_hops_total", "counter",
                  "chains of this node's requests' layers sent along their route to other nodes (one per step "
                  "and chain)", ("node",))
ROUTE_HOP_SECONDS = Spec("prism_route_hop_seconds_total", "counter",
                         "seconds from sending those chains to their answers (other nodes' layers and the hops)",
                         ("node",))
SEGMENTS = Spec("prism_segments_total", "counter", "other nodes' route segments run here", ("node",))
SEGMENT_SECONDS = Spec("prism_segment_seconds_total", "counter",
                       "seconds of the forward passes that ran them (layers, experts, KV)", ("node",))
FOREIGN_KV = Spec("prism_foreign_kv_slots", "gauge",
                  "KV cache slots held for other nodes' requests (one per request and segment)", ("node",))
# ---- every process on NATS ---------------------------------------------------------------------------
NETWORK_BYTES = Spec("prism_network_bytes_total", "counter",
                     "payload bytes through the process's NATS connection; direction=in|out; node=hub for "
                     "the placement service and the migrator", ("node", "direction"))
# ---- expert hosts (process hosts, and a gating's embedded hosts) -------------------------------------
HOST_MEMORY = Spec("prism_host_memory_bytes", "gauge", "expert weights resident (kind=used) and the budget (limit)",
                   ("host", "kind"))
HOST_EXPERTS = Spec("prism_host_experts", "gauge", "experts the host holds and answers", ("host",))
HOST_CALLS = Spec("prism_host_calls_total", "counter",
                  "expert calls answered: kind=bus (from NATS messages, HostStatus calls_served) or direct "
                  "(its own gating's, embedded: direct_calls)", ("host", "kind"))
HOST_TOKENS = Spec("prism_host_tokens_total", "counter", "rows of those calls, by the same kinds", ("host", "kind"))
HOST_BUSY = Spec("prism_host_busy_seconds_total", "counter", "seconds spent answering them, by the same kinds",
                 ("host", "kind"))
HOST_MESSAGES = Spec("prism_host_messages_total", "counter", "data messages answered", ("host",))
HOST_ERRORS = Spec("prism_host_errors_total", "counter", "data messages answered with an error", ("host",))
HOST_QUEUE = Spec("prism_host_queue_depth", "gauge", "data messages in flight", ("host",))
# ---- placement and migration (hub) -------------------------------------------------------------------
PLAN_EPOCH = Spec("prism_plan_epoch", "gauge",
                  "epoch of the placement plan: stage=published (placement service) or applied (migrator)",
                  ("stage",))
BALANCEDNESS = Spec("prism_expert_balancedness", "gauge",
                    "vLLM's EPLB balancedness over the statistics window: sum over MoE layers of the mean host "
                    "load over the sum of the busiest host's load (1 = even); load = (token, expert) calls, an "
                    "expert's split evenly over its live holders")
PLANNED_BATCH = Spec("prism_planned_batch", "gauge",
                     "sequences per forward step of a node's own requests, measured over the placement "
                     "service's horizon (what it plans with)", ("node",))
PLANNED_STEP_RATE = Spec("prism_planned_steps_per_second", "gauge",
                         "forward steps per second a node runs for its own requests, over the same horizon",
                         ("node",))
PLANNED_SECONDS = Spec("prism_planned_seconds", "gauge",
                       "measured times the placement service plans with, on a speed-1.0 host: kind=dense_layer "
                       "(the dense part of one layer of a step) or expert_call (one expert invocation)", ("kind",))
PLANNED_LINK_RTT = Spec("prism_planned_link_rtt_seconds", "gauge",
                        "round trip between a node and the hub that plans are made for: measured by the placement "
                        "service's probes where the node answers them, else the configured link", ("node",))
PLANNED_LINK_RATE = Spec("prism_planned_link_rate_bytes_per_second", "gauge",
                         "rate of a node's link to the hub that plans are made for (measured, or configured; "
                         "+Inf: no limit)", ("node",))
MIGRATION_STEPS = Spec("prism_migration_steps_total", "counter", "load and unload commands the migrator sent",
                       ("kind", "result"))
MIGRATION_SECONDS = Spec("prism_migration_seconds", "histogram", "time to apply one plan epoch, seconds",
                         ("result",), MIGRATION_BUCKETS)

SPECS: tuple[Spec, ...] = (
    REQUESTS, REQUEST_SECONDS, FIRST_TOKEN_SECONDS, PER_TOKEN_SECONDS, TOKENS, EXPERT_CALLS, EXPERT_MESSAGES,
    QUEUE_DEPTH, RUNNING, ROUTE_HOPS, ROUTE_HOP_SECONDS, SEGMENTS, SEGMENT_SECONDS, FOREIGN_KV, NETWORK_BYTES,
    HOST_MEMORY, HOST_EXPERTS, HOST_CALLS, HOST_TOKENS, HOST_BUSY, HOST_MESSAGES, HOST_ERRORS, HOST_QUEUE,
    PLAN_EPOCH, BALANCEDNESS, PLANNED_BATCH, PLANNED_STEP_RATE, PLANNED_SECONDS, PLANNED_LINK_RTT, PLANNED_LINK_RATE,
    MIGRATION_STEPS, MIGRATION_SECONDS,
)


def _counter(spec: Spec, registry: CollectorRegistry) -> Counter:
    return Counter(spec.family, spec.help, spec.labels, registry=registry)


def _histogram(spec: Spec, registry: CollectorRegistry) -> Histogram:
    return Histogram(spec.family, spec.help, spec.labels, registry=registry, buckets=spec.buckets)


def family(spec: Spec) -> CounterMetricFamily | GaugeMetricFamily:
    """An empty family of a counter or gauge spec, for a collector to fill."""
    if spec.kind == "counter":
        return CounterMetricFamily(spec.family, spec.help, labels=spec.labels)
    return GaugeMetricFamily(spec.family, spec.help, labels=spec.labels)


# ---- observed --------------------------------------------------------------------------------------


class RequestMetrics:
    """A node's requests as they finish (the gating; an HTTP front end can reuse it)."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self.node = node
        self._results = _counter(REQUESTS, registry)
        self._seconds = _histogram(REQUEST_SECONDS, registry).labels(node)
        self._first = _histogram(FIRST_TOKEN_SECONDS, registry).labels(node)
        self._per_token = _histogram(PER_TOKEN_SECONDS, registry).labels(node)
        tokens = _counter(TOKENS, registry)
        self._prompt, self._generated = tokens.labels(node, "prompt"), tokens.labels(node, "generated")

    def finished(
        self, result: str, prompt_tokens: int, generated_tokens: int, first_token_s: float, total_s: float
    ) -> None:
        """A request answered in full: `result` its finish reason, times from its arrival, seconds."""
        self._results.labels(self.node, result).inc()
        self._prompt.inc(prompt_tokens)
        self._generated.inc(generated_tokens)
        self._seconds.observe(total_s)
        self._first.observe(first_token_s)
        if generated_tokens >= 2:  # one token has no time per further token
            self._per_token.observe((total_s - first_token_s) / (generated_tokens - 1))

    def failed(self, code: str) -> None:
        """A request answered with an error (`code` from shared/errors.py)."""
        self._results.labels(self.node, code).inc()


class MigrationMetrics:
    """The migrator's commands and epochs."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._steps = _counter(MIGRATION_STEPS, registry)
        self._seconds = _histogram(MIGRATION_SECONDS, registry)
        self._applied = Gauge(PLAN_EPOCH.family, PLAN_EPOCH.help, PLAN_EPOCH.labels, registry=registry).labels(
            "applied"
        )

    def step(self, kind: str, ok: bool) -> None:
        self._steps.labels(kind, "ok" if ok else "failed").inc()

    def epoch(self, epoch: int, ok: bool, seconds: float) -> None:
        """An epoch's outcome; the applied epoch moves only when it was applied."""
        self._seconds.labels("ok" if ok else "failed").observe(seconds)
        if ok:
            self._applied.set(epoch)


# ---- read when scraped -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GatingSample:
    """A gating's counters at one moment."""

    node: str
    waiting: int  # requests queued for a slot
    running: int  # requests in the batch
    local_calls: int  # expert calls answered on the node (embedded, or a host of this node)
    remote_calls: int  # the other expert calls
    messages: int  # expert-call messages sent
    hops: int = 0  # chains of its requests' layers sent to other nodes
    hop_s: float = 0.0  # waiting for their answers
    segments: int = 0  # other nodes' segments run here
    segment_s: float = 0.0  # running them
    foreign_kv: int = 0  # KV slots held for other nodes' requests


class GatingCollector(Collector):
    def __init__(self, read: Callable[[], GatingSample]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        s = self.read()
        calls = family(EXPERT_CALLS)
        calls.add_metric([s.node, "local"], s.local_calls)
        calls.add_metric([s.node, "remote"], s.remote_calls)
        yield calls
        yield _one(EXPERT_MESSAGES, [s.node], s.messages)
        yield _one(QUEUE_DEPTH, [s.node], s.waiting)
        yield _one(RUNNING, [s.node], s.running)
        yield _one(ROUTE_HOPS, [s.node], s.hops)
        yield _one(ROUTE_HOP_SECONDS, [s.node], s.hop_s)
        yield _one(SEGMENTS, [s.node], s.segments)
        yield _one(SEGMENT_SECONDS, [s.node], s.segment_s)
        yield _one(FOREIGN_KV, [s.node], s.foreign_kv)


class HostsCollector(Collector):
    """Expert hosts of one process, from their HostStatus (one family per metric for all of them)."""

    def __init__(self, read: Callable[[], Sequence[HostStatus]]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        statuses = self.read()
        families = {spec: family(spec) for spec in (HOST_MEMORY, HOST_EXPERTS, HOST_CALLS, HOST_TOKENS, HOST_BUSY,
                                                    HOST_MESSAGES, HOST_ERRORS, HOST_QUEUE)}
        for s in statuses:
            families[HOST_MEMORY].add_metric([s.host, "used"], s.memory_used_bytes)
            families[HOST_MEMORY].add_metric([s.host, "limit"], s.memory_limit_bytes)
            families[HOST_EXPERTS].add_metric([s.host], len(s.experts))
            for kind, calls, tokens, busy in (("bus", s.calls_served, s.tokens_served, s.busy_s),
                                              ("direct", s.direct_calls, s.direct_tokens, s.direct_s)):
                families[HOST_CALLS].add_metric([s.host, kind], calls)
                families[HOST_TOKENS].add_metric([s.host, kind], tokens)
                families[HOST_BUSY].add_metric([s.host, kind], busy)
            families[HOST_MESSAGES].add_metric([s.host], s.messages_served)
            families[HOST_ERRORS].add_metric([s.host], s.errors)
            families[HOST_QUEUE].add_metric([s.host], s.queue_depth)
        if statuses:
            yield from families.values()


class ConnectionCollector(Collector):
    """Bytes through a NATS client connection, from its `stats` mapping (`in_bytes`, `out_bytes`)."""

    def __init__(self, node: str, read: Callable[[], Mapping[str, int]]) -> None:
        self.node = node
        self.read = read

    def collect(self) -> Iterator[Metric]:
        stats = self.read()
        bytes_ = family(NETWORK_BYTES)
        bytes_.add_metric([self.node, "in"], stats.get("in_bytes", 0))
        bytes_.add_metric([self.node, "out"], stats.get("out_bytes", 0))
        yield bytes_


@dataclass(frozen=True)
class PlacementSample:
    published_epoch: int  # 0 before any plan
    balancedness: float | None  # None without load in the window
    batch: dict[str, float] = field(default_factory=dict)  # node -> measured sequences per step
    step_rate: dict[str, float] = field(default_factory=dict)  # node -> measured steps per second
    seconds: dict[str, float] = field(default_factory=dict)  # "dense_layer" / "expert_call" -> seconds
    link_rtt: dict[str, float] = field(default_factory=dict)  # node -> round trip to the hub planned with, s
    link_rate: dict[str, float] = field(default_factory=dict)  # node -> its link's rate planned with, bytes/s


class PlacementCollector(Collector):
    def __init__(self, read: Callable[[], PlacementSample]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        s = self.read()
        yield _one(PLAN_EPOCH, ["published"], s.published_epoch)
        balance = family(BALANCEDNESS)
        if s.balancedness is not None:
            balance.add_metric([], s.balancedness)
        yield balance
        for spec, values in ((PLANNED_BATCH, s.batch), (PLANNED_STEP_RATE, s.step_rate), (PLANNED_SECONDS, s.seconds),
                             (PLANNED_LINK_RTT, s.link_rtt), (PLANNED_LINK_RATE, s.link_rate)):
            out = family(spec)
            for label, value in values.items():
                out.add_metric([label], value)
            yield out


def _one(spec: Spec, labels: list[str], value: float) -> CounterMetricFamily | GaugeMetricFamily:
    out = family(spec)
    out.add_metric(labels, value)
    return out
