"""Placement service: activation statistics → placement plans, one per cluster, connected to the hub.

Subjects and stores:
- `prism.v1.activations.*` in: each gating's activation reports, fed to windowed statistics with
  workload-shift detection (services/placement/stats.py).
- `prism.v1.host.*.status` in: host heartbeats; the live registry (also mirrored to KV `prism_hosts`,
  whose TTL drops silent hosts).
- `prism.v1.placement.cmd` in: `{"kind": "replan"}` plans now (operators, `prism demo`).
- `$SRV.PING` out, every `link_probe_s`: each node's round trip to the hub, from its services' answers,
  and (every 5th carrying `link_rate_bytes`) its rate (link_probe.py); KV `prism_placement` key `links`
  out when a node's measured delay or rate has moved: the links plans are made for from then on, and the
  gatings serve by.
- KV `prism_placement`, key `plan` out: `shared.schemas.Plan`, `{"epoch", "model", "policy", "hosts":
  {host: [[layer, expert]]}, "objective", "routes"}`; `routes` (home node → executing node per decoder
  layer) only when the policy made some (`pipeline`, `route`); the epoch only grows.

A plan is computed at start (once hosts are known), every `plan_interval_s`, and at once on a detected
shift; it is published only when the migration rule accepts it, in the measure the policy minimises
(objectives.judge), or as it is when the plan in place was made by another policy. Reports from
unknown nodes or with the wrong shape are dropped (logged once per node); a round that fails keeps the
current plan and the next round plans again. The policy and the migration rule run on a planning
thread at a lower CPU priority (`route` takes seconds on a big cluster): this service keeps answering
while it plans, and the gatings on the same machine come first.
KV writes from a leaf get "no responders" (measured with nats-server 2.10+), so this service connects to the
hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.kv import KeyValue
from nats.micro.service import Service
from pydantic import ValidationError

from services.placement.errors import PlacementError
from services.placement.link_probe import PROBE_WAIT_S, LinkProbe, links_moved, node_of
from services.placement.load import LoadTracker, first_host_speeds
from services.placement.objectives import judge
from services.placement.planner import (
    ClusterView,
    cluster_view,
    from_plan_hosts,
    from_plan_routes,
    to_plan_hosts,
    to_plan_routes,
)
from services.placement.policies import get_policy
from services.placement.settings import PlacementSettings
from services.placement.stats import RoutingStats
from services.placement.types import CoActivation, Placement, Workload
from shared import subjects
from shared.activations import ActivationReport
from shared.dtypes import DTYPE_BYTES
from shared.errors import BadRequest, PrismError
from shared.runtime import announce
from shared.schemas import HostStatus, Plan, load_json
from shared.topology import NODE_LINKS, LinkSpec, NodeLink

log = structlog.get_logger()

COACT_SAMPLES = 1024  # tokens per node drawn from the counts for the latency model
PLANNER_NICE = 10  # the planning thread's niceness: a plan can wait, a decode step cannot
T = TypeVar("T")


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority (Linux applies it to the thread alone); best effort."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PLANNER_NICE)


class PlanFailed(PrismError):
    """No plan fits the live hosts (a replan command's answer)."""

    code = "plan_failed"
    status = 409


@dataclass(frozen=True)
class ModelShape:
    name: str
    moe_layers: list[int]
    num_experts: int
    top_k: int
    expert_bytes: int
    hidden_size: int
    num_layers: int  # decoder layers, dense ones included (the length of a plan's routes)


class PlacementService:
    def __init__(
        self, nc: NatsClient, plans: KeyValue, hosts: KeyValue, settings: PlacementSettings, model: ModelShape
    ) -> None:
        self.nc = nc
        self.plans = plans
        self.hosts_kv = hosts
        self.settings = settings
        self.model = model
        self.nodes = settings.node_list()
        self.configured_links = settings.node_links()
        self.link_probe = LinkProbe(self.nodes, rate_bytes=settings.link_rate_bytes)
        self._rate_payload = os.urandom(settings.link_rate_bytes)  # incompressible (link_probe.py says why)
        self.links = self.configured_links  # what plans are made for: the last published (KV key `links`)
        self.stats = RoutingStats(len(self.nodes), len(model.moe_layers), model.num_experts, model.top_k)
        self.load = LoadTracker(len(self.nodes), settings.load_horizon_s)
        self.policy = get_policy(settings.policy)
        self.plan: dict[str, Any] | None = None
        self._seen: dict[str, tuple[HostStatus, float]] = {}
        self._started = time.monotonic()
        self._published_at = self._started  # a plan found in KV at start counts as just published
        self._failed_epoch = 0  # the last epoch the migrator reported as not applied
        self._replan = asyncio.Event()
        self._planning = asyncio.Lock()
        self._dropped_from: set[str] = set()  # nodes whose reports were dropped (logged once each)
        self._subs: list[Subscription] = []
        self._loop_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._micro: Service | None = None
        self._planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan", initializer=_lower_priority)

    async def start(self) -> None:
        with contextlib.suppress(Exception):  # no plan yet is normal
            entry = await self.plans.get(subjects.KV_PLAN_KEY)
            self.plan = json.loads(entry.value or b"{}")
        await self._start_links()
        self._subs = [
            await self.nc.subscribe(subjects.ALL_ACTIVATIONS, cb=self._on_activations),
            await self.nc.subscribe(subjects.ALL_HOST_STATUS, cb=self._on_status),
            await self.nc.subscribe(subjects.PLACEMENT_CMD, cb=self._on_cmd),
            await self.nc.subscribe(subjects.PLAN_EVENTS, cb=self._on_plan_event),
        ]
        self._loop_task = asyncio.create_task(self._plan_loop(), name="plan-loop")
        if self.settings.link_probe_s > 0:
            self._probe_task = asyncio.create_task(self._probe_loop(), name="link-probe")
        self._micro = await announce(self.nc, subjects.SERVICE_PLACEMENT, {"policy": self.settings.policy})
        log.info("placement_started", nodes=self.nodes, policy=self.settings.policy)

    async def _on_activations(self, msg: Msg) -> None:
        try:
            report = ActivationReport.decode(msg.data)
            if report.node not in self.nodes or report.layers != self.model.moe_layers:
                self._drop_once(report.node, f"not a node of {self.nodes} with MoE layers {self.model.moe_layers}")
                return
            node = self.nodes.index(report.node)
            self.load.add_steps(node, report.load, report.window_s)
            if not report.tokens.any():
                return
            event = self.stats.add_counts(node, report.counts, int(report.tokens.max()))
        except (PrismError, PlacementError) as err:
            log.warning("activation_report_dropped", subject=msg.subject, error=str(err))
            return
        if event is not None:
            log.info("workload_shift", node=report.node, distance=round(event.distance, 3))
            self._replan.set()

    def _drop_once(self, node: str, why: str) -> None:
        """Log the first report dropped from `node` (a misconfigured node reports every few seconds)."""
        if node not in self._dropped_from:
            self._dropped_from.add(node)
            log.warning("activation_reports_dropped", node=node, error=why)

    async def _on_status(self, msg: Msg) -> None:
        try:
            status = HostStatus.model_validate_json(msg.data)
        except ValidationError:
            log.warning("host_status_dropped", subject=msg.subject)
            return
        new = status.host not in self._seen
        self._seen[status.host] = (status, time.monotonic())
        self.load.add_host(status)
        with contextlib.suppress(Exception):  # the in-memory registry is authoritative here
            await self.hosts_kv.put(status.host, msg.data)
        planned = set((self.plan or {}).get("hosts", {}))
        if new and status.node in self.nodes and status.host not in planned:  # a host joined: give it work
            self._replan.set()

    async def _on_plan_event(self, msg: Msg) -> None:
        """The migrator's outcome of an epoch: a failed one is not waited for; the next planning round
        starts from what the hosts hold. (Not at once: a move that always fails fast would loop.)"""
        try:
            event = load_json(msg.data, "plan event")
            failed = isinstance(event, dict) and event.get("ok") is False and isinstance(event.get("epoch"), int)
        except BadRequest:
            return
        if failed:
            log.info("plan_not_applied", epoch=event["epoch"], error=event.get("error"))
            self._failed_epoch = max(self._failed_epoch, event["epoch"])

    async def _on_cmd(self, msg: Msg) -> None:
        """`{"kind": "replan"}`: plan now; answers {"epoch", "published"} or an error reply."""
        try:
            if load_json(msg.data or b"{}", "command") != {"kind": "replan"}:
                raise BadRequest('unknown command; accepted: {"kind": "replan"}')
            published = await self.plan_once()
            body = {"epoch": (self.plan or {}).get("epoch", 0), "published": published}
            await msg.respond(json.dumps(body).encode())
        except BadRequest as err:  # InvalidJSON is a BadRequest
            await self._reply_error(msg, err)
        except PlacementError as exc:  # no plan fits the live hosts (e.g. too little memory left)
            await self._reply_error(msg, PlanFailed(str(exc)))
        except Exception:
            log.exception("replan_failed")
            await self._reply_error(msg, PrismError("the placement service failed to plan; see its log"))

    async def _reply_error(self, msg: Msg, err: PrismError) -> None:
        if msg.reply:
            await self.nc.publish(msg.reply, err.body(), headers=err.headers())

    def live_hosts(self) -> list[HostStatus]:
        horizon = time.monotonic() - self.settings.host_ttl_s
        return [status for status, seen in self._seen.values() if seen >= horizon]

    async def _probe_loop(self) -> None:
        """Time every node's round trip every `link_probe_s` (no probe starts while a policy solves: its
        thread would delay the answers' callbacks on this loop), and publish the links when one has moved."""
        probes = 0
        while not self.nc.is_closed:  # closed for good: the service is stopping
            if not self._planning.locked():
                try:
                    await self._probe(self.link_probe.loaded(probes))
                    probes += 1
                    measured = self.link_probe.links(self.configured_links)
                    if links_moved(self.links, measured, self.link_probe.rate_bytes):
                        await self._publish_links(measured)
                except Exception as exc:  # the hub restarting: probe again next period
                    log.debug("link_probe_failed", error=str(exc))
            await asyncio.sleep(self.settings.link_probe_s)

    async def _probe(self, loaded: bool) -> None:
        """One `$SRV.PING`, `loaded` with the rate payload or empty: the first answer of each node, timed
        (link_probe.py says why)."""
        sub = await self.nc.subscribe(inbox := self.nc.new_inbox())
        answered: set[str] = set()
        try:
            sent = time.perf_counter()
            await self.nc.publish("$SRV.PING", self._rate_payload if loaded else b"", reply=inbox)
            while len(answered) < len(self.nodes) and (left := sent + PROBE_WAIT_S - time.perf_counter()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except NatsTimeoutError:
                    break
                if (node := node_of(msg.data)) in self.nodes and node not in answered:
                    answered.add(node)
                    self.link_probe.add(node, time.perf_counter() - sent, loaded)
        finally:
            await sub.unsubscribe()

    async def _start_links(self) -> None:
        """Publish the links plans start with: what was measured before a restart (when probing, and the
        links name these nodes: the delays, and the rates when measuring those), else the configured
        links; so no gating keeps serving by links this service does not plan with."""
        links = dict(self.configured_links)
        before: list[NodeLink] = []
        if self.settings.link_probe_s > 0:
            with contextlib.suppress(Exception):  # none published yet is normal
                before = NODE_LINKS.validate_json((await self.plans.get(subjects.KV_LINKS_KEY)).value or b"")
        if [link.node for link in before] == self.nodes:
            for link in before:
                rate = link.rate_mbit if self.settings.link_rate_bytes > 0 else links[link.node].rate_mbit
                links[link.node] = LinkSpec(delay_ms=link.delay_ms, rate_mbit=rate)
        await self._publish_links(links)

    async def _publish_links(self, links: dict[str, LinkSpec]) -> None:
        """Plan with `links` from now on, and have the gatings serve by them (KV key `links`): the
        nearest holder of a remote expert is then the same in both."""
        named = [NodeLink(node=node, **link.model_dump()) for node, link in links.items()]
        await self.plans.put(subjects.KV_LINKS_KEY, NODE_LINKS.dump_json(named))
        self.links = links
        log.info("links_published", delay_ms={node: link.delay_ms for node, link in links.items()},
                 rate_mbit={node: link.rate_mbit for node, link in links.items()})

    async def _plan_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.plan_interval_s):
                    await self._replan.wait()
            self._replan.clear()
            try:
                await self.plan_once()
            except PlacementError as err:
                log.warning("plan_failed", error=str(err))
            except Exception:  # a KV write while the hub restarts, a policy bug: plan again next round
                log.exception("plan_failed")

    async def plan_once(self) -> bool:
        """Compute a plan and publish it if the migration rule accepts it; True when published."""
        async with self._planning:  # the plan loop and a replan command: one at a time, one epoch each
            return await self._plan_once()

    async def _plan_once(self) -> bool:
        live = {s.host: s for s in self.live_hosts()}  # one snapshot: a host may expire during the round
        # Nodes with a live host. One without (its hosts lost) still sends requests, which the plan
        # leaves out: every expert is remote to it, and where they sit is chosen for the others.
        serving = [n for n in self.nodes if any(s.node == n for s in live.values())]
        if not serving:
            return False
        links = self.links
        view = cluster_view(list(live.values()), serving, self.model.expert_bytes, links)
        current = self._current_placement(view, live)
        if (wait := self._reason_to_wait(view, live, current)) is not None:
            log.info(wait, epoch=(self.plan or {}).get("epoch"), live=view.hosts)
            return False
        rows = [self.nodes.index(n) for n in serving]
        freq = self.stats.counts()[rows]
        # Reports carry counts, not top-k sets: sets drawn from them, enough that two draws rate a
        # placement alike (with the latency model's default of 64 a steady workload moved on noise).
        coact = CoActivation.independent(freq, self.model.top_k, samples_per_node=COACT_SAMPLES)
        workload = self._workload(rows, live.values(), links)
        proposed = await self._solve(self.policy, freq, view.cluster, coact=coact, current=current, workload=workload)
        if current is not None and (self.plan or {}).get("policy") == self.settings.policy:
            verdict = await self._solve(judge, self.settings.policy, freq, current, proposed, view.cluster,
                                        coact=coact, workload=workload,
                                        migration_cost_calls=self.settings.migration_cost_calls)
            log.info("plan_accepted" if verdict.accept else "plan_kept", cost=round(verdict.before, 6),
                     proposed_with_migration=round(verdict.after, 6), unit=verdict.unit)
            if not verdict.accept:
                return False
        await self._publish(proposed, view, freq, links)
        return True

    async def _solve(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` on the planning thread: a policy takes seconds on a big cluster (`route`: 7 s at 16 nodes
        of DeepSeek-V3's shape), during which this loop keeps taking heartbeats, reports and commands;
        the thread runs at a lower CPU priority, so the gatings sharing the machine come first."""
        return await asyncio.get_running_loop().run_in_executor(self._planner, functools.partial(fn, *args, **kwargs))

    def _reason_to_wait(self, view: ClusterView, live: dict[str, HostStatus], current: Any) -> str | None:
        """Why this round publishes nothing whatever the statistics say (a log event), or None."""
        if self._migration_in_flight(live):
            return "plan_waits_for_migration"
        if current is None and self._plan_hosts_may_still_come(view):
            return "plan_waits_for_hosts"
        if current is not None and self.stats.window_tokens().sum() < self.settings.min_window_tokens:
            return "plan_waits_for_statistics"
        return None

    def _load_s(self, nodes: list[str], links: dict[str, LinkSpec]) -> np.ndarray:
        """[n] seconds to load one replica on each node: the expert over its own link from the hub's
        object store (an unlimited link: 1 Tbit/s)."""
        rates = [links[node].shape().rate_Bps or 1e12 / 8 for node in nodes]
        return self.model.expert_bytes / np.array(rates)

    def _workload(self, rows: list[int], live: Iterable[HostStatus], links: dict[str, LinkSpec]) -> Workload:
        """The latency model's view of the traffic of nodes `rows` (`live` their hosts): what the gatings and
        hosts measured (batch, step rate, request length, dense and expert time: services/placement/load.py), the
        model's hidden state per token, and loading one replica over each node's link spread over the
        decode steps of the window (the simulator's Replanner charges it the same way)."""
        speeds = first_host_speeds(live, [self.nodes[i] for i in rows])
        measured = self.load.measured(rows, speeds=speeds)
        steps = max(float(self.stats.window_tokens()[rows].sum()) / float(measured.batch.sum()), 1.0)
        load_s = self._load_s([self.nodes[i] for i in rows], links)
        log.info("plan_workload", batch=measured.batch.tolist(),
                 step_rate=None if measured.step_rate is None else np.round(measured.step_rate, 2).tolist(),
                 dense_ms=None if measured.dense_time_s is None else round(1e3 * measured.dense_time_s, 4),
                 expert_ms=None if measured.expert_time_s is None else round(1e3 * measured.expert_time_s, 4),
                 tokens_per_request=None if measured.tokens_per_request is None
                 else round(measured.tokens_per_request, 1))
        return measured.workload(bytes_per_token=self.model.hidden_size * DTYPE_BYTES[self.settings.dtype],
                                 top_k=self.model.top_k, migration_cost_s=load_s / steps,
                                 min_gain=self.settings.min_gain)

    def _migration_in_flight(self, live: dict[str, HostStatus] | None = None) -> bool:
        """The live hosts do not hold the current plan yet (its migration runs), for at most the
        timeout. A host of the plan that is gone is not migrating: the next plan leaves it out."""
        if self.plan is None or "hosts" not in self.plan:
            return False
        if self.plan.get("epoch") == self._failed_epoch:
            return False  # the migrator gave up on it: plan again from what the hosts really hold
        if time.monotonic() - self._published_at > self.settings.migration_timeout_s:
            return False  # stuck: plan again from what the hosts really hold
        live = live if live is not None else {s.host: s for s in self.live_hosts()}
        for host, keys in self.plan["hosts"].items():
            status = live.get(host)
            if status is not None and {(k[0], k[1]) for k in keys} != set(status.experts):
                return True
        return False

    def _plan_hosts_may_still_come(self, view: ClusterView) -> bool:
        """A host of the current plan not heard from yet, shortly after start: wait for it rather
        than re-plan without it (a host silent for longer than the TTL since start counts as lost)."""
        if self.plan is None or "hosts" not in self.plan:
            return False
        missing = set(self.plan["hosts"]) - set(view.hosts)
        return bool(missing) and time.monotonic() - self._started < 2 * self.settings.host_ttl_s

    def _current_placement(self, view: ClusterView, live: dict[str, HostStatus]) -> Any:
        """What the hosts really hold (their heartbeats), when they are the hosts of the current plan
        and hold every expert; else None (a host joined or left: the next plan is published as is).
        Reality, not the last plan, because a migration can fail half-way."""
        if self.plan is None or "hosts" not in self.plan:
            return None
        if from_plan_hosts(self.plan["hosts"], view, self.model.moe_layers, self.model.num_experts) is None:
            return None
        resident = {host: [list(k) for k in live[host].experts] for host in view.hosts}
        held = from_plan_hosts(resident, view, self.model.moe_layers, self.model.num_experts, require_coverage=True)
        if held is None:
            return None
        return Placement(held.hosts, routes=from_plan_routes(self.plan.get("routes"), view, self.model.moe_layers))

    async def _publish(self, placement: Any, view: ClusterView, freq: np.ndarray, links: dict[str, LinkSpec]) -> None:
        from services.placement.types import proxy_objective

        plan = Plan(
            epoch=(self.plan or {}).get("epoch", 0) + 1,
            model=self.model.name,
            policy=self.settings.policy,
            hosts=to_plan_hosts(placement, view, self.model.moe_layers),  # type: ignore[arg-type]
            objective=proxy_objective(freq, placement, view.cluster),
            routes=to_plan_routes(placement.routes, view, self.model.moe_layers, self.model.num_layers),
        )
        payload = plan.encode()
        await self.plans.put(subjects.KV_PLAN_KEY, payload)
        self.plan = json.loads(payload)
        self._published_at = time.monotonic()
        log.info("plan_published", epoch=plan.epoch, objective=plan.objective, hosts=len(view.hosts),
                 routed_homes=sum(r != [h] * len(r) for h, r in (plan.routes or {}).items()))

    async def stop(self) -> None:
        if self._micro:
            with contextlib.suppress(Exception):
                await self._micro.stop()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for task in (self._loop_task, self._probe_task):
            if task:
                task.cancel()
        self._planner.shutdown(wait=False, cancel_futures=True)


def model_shape(settings: PlacementSettings) -> ModelShape:
    from shared.model.checkpoint import load_config
    from shared.model.config import list_moe_layers

    config = load_config(settings.model)
    return ModelShape(
        name=settings.model.name,
        moe_layers=list_moe_layers(config),
        num_experts=config.num_experts,
        top_k=config.top_k,
        expert_bytes=config.expert_nbytes(settings.dtype),
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
    )


async def build(nc: NatsClient, settings: PlacementSettings) -> PlacementService:
    js = nc.jetstream(domain=subjects.JETSTREAM_DOMAIN)
    plans = await js.create_key_value(bucket=settings.plans_bucket, history=16)
    hosts = await js.create_key_value(bucket=settings.hosts_bucket, ttl=settings.host_ttl_s)
    return PlacementService(nc, plans, hosts, settings, model_shape(settings))


async def main(settings: PlacementSettings) -> None:
    from services.placement.metrics import placement_registry
    from shared.logs import configure_logging
    from shared.metrics_http import serve_metrics
    from shared.runtime import connect, serve_until_stopped

    configure_logging(settings.log_level, settings.log_format, service="placement")
    nc = await connect(settings, "placement")
    service = await build(nc, settings)
    async with serve_metrics(placement_registry(service), settings.metrics_bind, settings.metrics_port, "placement"):
        await serve_until_stopped(service.start(), service.stop, nc)


def main_cli() -> None:
    from shared.runtime import run_service

    run_service(PlacementSettings, main, "placement")
