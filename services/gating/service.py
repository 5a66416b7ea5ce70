"""Gating: request intake for one node, dense forward with continuous batching, replies.

Subjects:
- `prism.v1.infer.<node>` (a plain subscription; nats.micro service `prism-gating` is for discovery): JSON InferRequest;
  replies go to the message's reply subject, or for MQTT clients (no reply subject) to
  `prism.v1.reply.<client_id>` (MQTT `prism/v1/reply/<client_id>`). Streaming requests get one
  TokenChunk per token, then a FinalReply; errors are one ErrorReply plus Nats-Service-Error headers.
- `prism.v1.infer.<node>.cancel` (nats.micro endpoint `cancel`, a queue group per instance so that every
  gating of the node sees it): `{"reply_to"}` stops the requests replying there (error reply `cancelled`),
  and frees their batch slots at the next step; answers `{"cancelled": n}` when asked. The service's
  `$SRV.STATS` endpoint data is a GatingLoad (active, waiting, max_batch, cancelled, foreign KV, route and
  shared-dispatch counts).
- `prism.v1.host.<host>.calls` / `prism.v1.expert.<layer>.<expert>`: expert calls out (see dispatch.py);
  `prism.v1.host.*.status` in: who holds which expert (directory.py).
- `prism.v1.activations.<node>`: activation report every `activation_interval_s`.
- `prism.v1.route.<node>.segment` / `.release` in, the next node's `segment` out: other nodes' route
  segments executed here, and this node's requests' layers executed elsewhere (see hops.py).

Failure behaviour: a bad request is answered with an error and touches nothing else; a missing
expert fails the requests that needed it with `expert_unavailable` within the timeout while the
others continue; when the queue is full new requests get `overloaded`; at shutdown, requests still
running after `drain_timeout_s` get `shutting_down`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

import structlog
import torch
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service, ServiceConfig

from services.expert_host.service import ExpertHost, load_weights
from services.expert_host.settings import ExpertHostSettings
from services.gating.directory import HostDirectory
from services.gating.dispatch import NodeExperts
from services.gating.engine import DoneEvent, Engine, ErrorEvent, Sequence, TokenEvent, seq_id
from services.gating.hops import RouteHops, SegmentService, watch_plan_events, watch_plans
from services.gating.lockstep import Lockstep
from services.gating.metrics import gating_registry, observe_finished
from services.gating.route_plan import RouteFollower
from services.gating.routes import Route, check_route, foreign_nodes
from services.gating.segments import SegmentRunner
from services.gating.settings import EmbeddedHost, GatingSettings
from shared import subjects
from shared.activations import ActivationCounter
from shared.errors import (
    BadRequest,
    Cancelled,
    PrismError,
    PromptTooLong,
    RouteNotServing,
    RouteUnavailable,
    ShuttingDown,
    TokenOutOfRange,
)
from shared.model.inference import inference_only, use_threads
from shared.model.model import MoEModel
from shared.model.sampling import SamplingParams
from shared.model.tokenizer import Tokenizer
from shared.schemas import (
    ErrorBody,
    ErrorReply,
    FinalReply,
    GatingLoad,
    InferRequest,
    Timings,
    TokenChunk,
    Usage,
    parse_cancel,
    parse_request,
    reply_hints,
)

log = structlog.get_logger()
SERVICE_NAME = subjects.SERVICE_GATING
REPLY_GRACE_S = 1.0  # for the error replies of requests still running when the drain ends
EMBEDDED_LINGER_S = 0.5  # a decoding node asks every few ms: this long without a message, nobody still needs us


class Gating:
    def __init__(
        self,
        nc: NatsClient,
        settings: GatingSettings,
        engine: Engine,
        tokenizer: Tokenizer | None,
        counter: ActivationCounter,
        *,
        directory: HostDirectory | None = None,
        hosts: list[ExpertHost] | None = None,
        hops: RouteHops | None = None,
        segments: SegmentService | None = None,
        route: Route | None = None,
        lockstep: Lockstep | None = None,
    ) -> None:
        self.nc = nc
        self.lockstep = lockstep
        self.hops = hops
        self.segments = segments
        self.route = route  # new requests take it; a running one keeps the route it started with
        self.planned_route = route  # the settings' or the plan's; `route` leaves it for a while when it breaks
        if hops is not None:
            engine.on_finish = self._release_route
        self.hosts = hosts or []  # embedded expert hosts: started before intake, stopped after the engine
        self.settings = settings
        self.engine = engine
        self.tokenizer = tokenizer
        self.counter = counter
        self.directory = directory
        self.vocab_size = engine.model.config.vocab_size
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._micro: Service | None = None
        self._intake: Subscription | None = None
        self._status: Subscription | None = None
        self._route_subs: list[Subscription] = []
        self._running: dict[str, list[Sequence]] = {}  # reply subject → its requests still answering
        self.cancelled = 0
        self.restarted_at_home = 0  # requests whose route had a node not serving segments (`_start_at_home`)
        self.registry, self.metrics = gating_registry(self)  # served on METRICS_PORT by main()

    async def start(self) -> None:
        # Discoverable with $SRV.PING/INFO/STATS; intake is a plain subscription because one request is
        # answered by many messages (streaming) and MQTT requests carry no reply subject.
        for host in self.hosts:
            await host.start()
        node = self.settings.node
        metadata = {"node": node, "subject": subjects.infer(node)}
        config = ServiceConfig(name=SERVICE_NAME, version="1.0.0", metadata=metadata, stats_handler=self._stats_data)
        self._micro = await add_service(self.nc, config)
        await self._micro.add_endpoint(  # its own queue group: each gating of the node hears every cancel
            name="cancel", subject=subjects.cancel(node), handler=self._on_cancel, queue_group=f"c{uuid.uuid4().hex}"
        )
        directory = self.directory
        if directory is not None:  # who holds what, from host heartbeats: one message per host and layer

            async def on_status(msg: Msg) -> None:
                directory.on_status(msg.data)

            self._status = await self.nc.subscribe(subjects.ALL_HOST_STATUS, cb=on_status)
        if self.segments is not None:
            node = self.settings.node
            self._route_subs = [
                await self.nc.subscribe(subjects.route_segment(node), cb=self.segments.on_segment),
                await self.nc.subscribe(subjects.route_release(node), cb=self.segments.on_release),
            ]
        self._intake = await self.nc.subscribe(
            subjects.infer(self.settings.node), queue=f"gating-{self.settings.node}", cb=self._on_request
        )
        self._background = [
            asyncio.create_task(self.engine.run(), name="engine"),
            asyncio.create_task(self._report_activations(), name="activations"),
        ]
        if self.segments is not None:
            self._background.append(asyncio.create_task(self.segments.serve(), name="segments"))
        follower = None
        if not self.settings.route:  # no fixed route: follow the plan's
            follower = RouteFollower(self.settings.node, self.engine.model.config.num_layers, self._switch_route)
            self._route_subs.append(await watch_plan_events(self.nc, follower))
        handlers: dict[str, Callable[..., None]] = {}
        if follower is not None:
            handlers[subjects.KV_PLAN_KEY] = follower.on_plan
        if directory is not None:  # the links the plans are made for: serve remote experts by them
            handlers[subjects.KV_LINKS_KEY] = directory.use_links
        if handlers:
            watch = watch_plans(self.nc, self.settings.plans_bucket, self.settings.node, handlers)
            self._background.append(asyncio.create_task(watch, name="plans"))
        await self.nc.flush()
        log.info("gating_started", node=self.settings.node)

    # ---- intake ------------------------------------------------------------------------------

    async def _on_request(self, msg: Msg) -> None:
        try:
            req = parse_request(msg.data)
        except PrismError as err:  # answer where the request asked, MQTT clients included
            request_id, client_id = reply_hints(msg.data)
            await self._send_error(msg.reply or (client_id and subjects.reply(client_id)), request_id, err)
            return
        reply_to = msg.reply or (req.client_id and subjects.reply(req.client_id))
        if not reply_to:  # nobody could ever read the answer: do not spend a batch slot on it
            log.warning("request_without_reply_subject", node=self.settings.node)
            return
        try:
            params = SamplingParams(req.temperature, req.top_p, req.seed)
            seq = Sequence(self._prompt_ids(req), req.max_tokens, params, route=self.route, stream=req.stream)
            self.engine.submit(seq)
        except PrismError as err:
            await self._send_error(reply_to, req.id, err)
            return
        task = asyncio.create_task(self._respond(seq, req, reply_to), name=f"reply-{seq.key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._running.setdefault(reply_to, []).append(seq)
        task.add_done_callback(lambda _: self._forget(reply_to, seq))

    def _forget(self, reply_to: str, seq: Sequence) -> None:
        seqs = self._running.get(reply_to, [])
        if seq in seqs:
            seqs.remove(seq)
        if not seqs:
            self._running.pop(reply_to, None)

    # ---- cancel and load ---------------------------------------------------------------------

    async def _on_cancel(self, request: Request) -> None:
        try:
            cancel = parse_cancel(request.data)
        except PrismError as err:
            with contextlib.suppress(ValueError):  # ValueError: nobody asked for an answer
                await request.respond(err.body(), headers=err.headers())
            return
        why = Cancelled("the requester cancelled this request")
        stopped = sum(self.engine.cancel(seq, why) for seq in list(self._running.get(cancel.reply_to, [])))
        self.cancelled += stopped
        if stopped:
            log.info("request_cancelled", node=self.settings.node, requests=stopped)
        with contextlib.suppress(ValueError):
            await request.respond(f'{{"cancelled": {stopped}}}'.encode())

    def load(self) -> GatingLoad:
        engine = self.engine
        return GatingLoad(
            node=self.settings.node,
            active=len(engine.active),
            waiting=len(engine.waiting),
            max_batch=self.settings.max_batch,
            cancelled=self.cancelled,
            foreign_kv=len(self.segments.runner.slots) if self.segments else 0,
            segments_run=self.segments.runner.segments_run if self.segments else 0,
            segment_batches=self.segments.runner.forwards if self.segments else 0,
            segment_s=self.segments.runner.busy_s if self.segments else 0.0,
            hops_sent=self.hops.sent if self.hops else 0,
            restarted_at_home=self.restarted_at_home,
            shared_dispatches=self.lockstep.shared_dispatches if self.lockstep else 0,
            shared_calls=self.lockstep.shared_parts if self.lockstep else 0,
            route=list(self.route or []),
        )

    def _stats_data(self, endpoint: EndpointStats) -> dict[str, object]:
        return {"load": self.load().model_dump()}

    def _prompt_ids(self, req: InferRequest) -> list[int]:
        if req.input_ids is not None:
            ids = req.input_ids
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise TokenOutOfRange(f"input_ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        elif self.tokenizer is None:
            raise BadRequest("this model has no tokenizer.json; send 'input_ids' instead of 'prompt'")
        else:
            ids = self.tokenizer.encode(req.prompt or "")
            if not ids:
                raise BadRequest("the prompt encodes to no tokens")
        if len(ids) >= self.engine.max_len:
            raise PromptTooLong(
                f"prompt has {len(ids)} tokens; this node's context is {self.engine.max_len} "
                "tokens including at least one generated"
            )
        return ids

    # ---- replies -----------------------------------------------------------------------------

    async def _respond(self, seq: Sequence, req: InferRequest, reply_to: str) -> None:
        stream = self.tokenizer.stream() if self.tokenizer else None
        while True:
            event = await seq.events.get()
            if isinstance(event, ErrorEvent) and (retry := self._start_at_home(seq, event.error, reply_to)):
                seq = retry
                continue
            if isinstance(event, TokenEvent):
                if req.stream:
                    text = stream.push(event.token_id) if stream else ""
                    if stream and event.last:  # a character left incomplete: as the final text has it
                        text += stream.flush()
                    chunk = TokenChunk(id=req.id, index=event.index, token_id=event.token_id, text=text)
                    await self.nc.publish(reply_to, chunk.model_dump_json().encode())
            elif isinstance(event, ErrorEvent):
                await self._send_error(reply_to, req.id, seq.cancelled or event.error)
                return
            else:
                observe_finished(self.metrics, seq, event.finish_reason)
                await self.nc.publish(reply_to, self._final(seq, req, event).model_dump_json().encode())
                return

    def _start_at_home(self, seq: Sequence, error: PrismError, reply_to: str) -> Sequence | None:
        """A request whose route has a node with nothing subscribed to its segments (starting up, or gone)
        starts again at home before its first token, where every expert is reachable, instead of failing;
        the new sequence replaces it for cancels. None: the error stands."""
        if seq.cancelled or not (isinstance(error, RouteNotServing) and seq.route is not None and not seq.generated):
            return None
        again = Sequence(seq.prompt, seq.max_tokens, seq.params, route=None, stream=seq.stream, arrived=seq.arrived)
        try:
            self.engine.submit(again)
        except PrismError:
            return None
        log.info("request_restarted_at_home", node=self.settings.node, error=error.message)
        running = self._running.setdefault(reply_to, [])
        running[:] = [again if s is seq else s for s in running]
        self.restarted_at_home += 1
        return again

    def _final(self, seq: Sequence, req: InferRequest, done: DoneEvent) -> FinalReply:
        text = self.tokenizer.decode(seq.generated) if self.tokenizer else ""
        timings = Timings(
            queue_s=seq.admitted - seq.arrived,
            prefill_s=seq.first_token - seq.admitted,
            decode_s=seq.finished - seq.first_token,
            expert_wait_s=seq.expert_wait_s,
            local_experts_s=seq.local_experts_s,
            remote_wait_s=seq.remote_wait_s,
            hop_wait_s=seq.hop_wait_s,
            total_s=seq.finished - seq.arrived,
        )
        usage = Usage(prompt_tokens=len(seq.prompt), completion_tokens=len(seq.generated))
        return FinalReply(
            id=req.id,
            text=text,
            token_ids=seq.generated,
            finish_reason=done.finish_reason,
            usage=usage,
            timings=timings,
        )

    async def _send_error(self, reply_to: str | None, request_id: str | None, err: PrismError) -> None:
        log.info("request_failed", node=self.settings.node, code=err.code, error=err.message)
        self.metrics.failed(err.code)
        if not reply_to:
            return
        body = ErrorReply(id=request_id, error=ErrorBody(code=err.code, message=err.message))
        await self.nc.publish(reply_to, body.model_dump_json().encode(), headers=err.headers())

    def _release_route(self, seq: Sequence) -> None:
        """A finished request's KV on the other nodes of its route is freed (they also expire it). A route
        that broke under it is left for `route_retry_s`: new requests stay home meanwhile (slower, but
        every expert is still reachable from home), until the plan gives a new route or the time is up."""
        nodes = foreign_nodes(seq.route, self.settings.node)
        if nodes and self.hops is not None:
            task = asyncio.create_task(self.hops.release(seq_id(self.settings.node, seq), nodes))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if isinstance(seq.error, RouteUnavailable) and seq.route == self.route:
            log.warning("route_left", node=self.settings.node, error=seq.error.message,
                        retry_s=self.settings.route_retry_s)
            self.route = None
            broken = seq.route
            asyncio.get_running_loop().call_later(self.settings.route_retry_s, self._retry_route, broken)

    def _retry_route(self, broken: Route | None) -> None:
        if self.route is None and self.planned_route == broken:  # nothing newer came meanwhile
            self.route = broken

    def _switch_route(self, route: Route | None, epoch: int) -> None:
        if route != self.planned_route:
            log.info("route_switched", node=self.settings.node, epoch=epoch, route=list(route or []))
        self.route = self.planned_route = route

    # ---- activations -------------------------------------------------------------------------

    async def _report_activations(self) -> None:
        subject = subjects.activations(self.settings.node)
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.activation_interval_s)
            now = time.monotonic()
            report = self.counter.take(now - last, self.engine.load.take())
            last = now
            if report.tokens.any() or report.load.steps:
                await self.nc.publish(subject, report.encode())

    async def stop(self) -> None:
        """Stop intake, let running requests finish (bounded), then stop the engine; a request still
        running then gets a `shutting_down` error reply, never silence. Embedded hosts then answer other
        nodes until those stop asking (bounded), and stop. Idempotent."""
        intake, micro, self._intake, self._micro = self._intake, self._micro, None, None
        if intake:
            await intake.unsubscribe()
        if micro:
            await micro.stop()
        await self._wait_for_replies(self.settings.drain_timeout_s)
        for sub in self._route_subs:  # other nodes' segments stop here too; those queued get shutting_down
            await sub.unsubscribe()
        self._route_subs = []
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        status, self._status = self._status, None  # kept until the engine stops: draining requests route by it
        if status:
            await status.unsubscribe()
        self.engine.abort(ShuttingDown(f"node {self.settings.node} is shutting down; retry on another node"))
        await self._wait_for_replies(REPLY_GRACE_S)  # the error replies go out
        self.engine.close()
        # Other nodes' requests may still need the embedded experts: serve them until they stop asking.
        await asyncio.gather(*(h.linger(EMBEDDED_LINGER_S, self.settings.drain_timeout_s) for h in self.hosts))
        for host in self.hosts:
            await host.stop()
        log.info("gating_stopped", node=self.settings.node)

    async def _wait_for_replies(self, timeout_s: float) -> None:
        """Up to `timeout_s` for the reply tasks, without cancelling them (a timed-out gather would)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)


def build(nc: NatsClient, settings: GatingSettings) -> Gating:
    """Load the dense model and tokenizer and wire the gating's components."""
    from shared.model.config import list_moe_layers

    model = MoEModel.from_checkpoint(settings.model, dtype=getattr(torch, settings.dtype), device=settings.device)
    tokenizer = Tokenizer.from_dir(settings.model) if (settings.model / "tokenizer.json").exists() else None
    config = model.config
    counter = ActivationCounter(settings.node, list_moe_layers(config), config.num_experts)
    directory = HostDirectory(settings.node, settings.host_ttl_s, settings.links) if settings.host_messages else None
    hosts = [embedded_host(nc, settings, spec) for spec in settings.embedded_hosts]
    experts = NodeExperts(
        nc,
        timeout_s=settings.expert_timeout_s,
        max_payload=settings.max_payload_bytes,
        counter=counter,
        directory=directory,
        embedded=hosts,
    )
    # Stop where the model's own config says (as transformers' generate does), else at the tokenizer's EOS.
    stop_ids = frozenset(config.eos_token_ids) or frozenset(
        [tokenizer.eos_token_id] if tokenizer and tokenizer.eos_token_id is not None else []
    )
    max_len = min(settings.max_context, config.max_position_embeddings)
    payload = settings.max_payload_bytes
    hops = RouteHops(nc, settings.node, layer_timeout_s=settings.expert_timeout_s, max_payload=payload,
                     counter=counter)
    lockstep = Lockstep(experts, list_moe_layers(config))  # own step and segments share each layer's dispatch
    engine = Engine(
        model,
        lockstep.counted,
        max_slots=settings.max_batch,
        max_len=max_len,
        max_queue=settings.max_queue,
        inline_max_tokens=settings.inline_max_tokens,
        stop_ids=stop_ids,
        home=settings.node,
        hops=hops,
        streams=lockstep,
    )
    runner = SegmentRunner(
        settings.node, model, lockstep.uncounted, max_slots=settings.max_foreign, max_len=max_len,
        idle_ttl_s=settings.foreign_ttl_s, inline_max_tokens=settings.inline_max_tokens, streams=lockstep,
    )
    segments = SegmentService(nc, runner, hidden_size=config.hidden_size, max_payload=settings.max_payload_bytes)
    route = check_route(settings.route, config.num_layers) if settings.route else None
    return Gating(nc, settings, engine, tokenizer, counter, directory=directory, hosts=hosts,
                  hops=hops, segments=segments, route=route, lockstep=lockstep)


def embedded_host(nc: NatsClient, settings: GatingSettings, spec: EmbeddedHost) -> ExpertHost:
    """An expert host in this process, on the gating's connection, with the experts of `spec`."""
    shared = ("nats_url", "nats_user", "nats_password", "max_payload_bytes", "log_level", "log_format")
    fields: dict[str, object] = {name: getattr(settings, name) for name in shared}
    host_settings = ExpertHostSettings(
        **fields,  # type: ignore[arg-type]  # the connection and logging settings the two share
        host=spec.host,
        node=settings.node,
        model=settings.model,
        experts=spec.experts,
        memory_limit_mb=spec.memory_limit_mb,
        device=spec.device,
        speed=spec.speed,
        dtype=settings.dtype,
        drain_timeout_s=settings.drain_timeout_s,
        inline_max_tokens=settings.inline_max_tokens,
        busy_poll_s=0.0,  # the gating's own steps keep the process awake
    )
    weights, hidden_size = load_weights(host_settings)
    return ExpertHost(nc, host_settings, weights, hidden_size, embedded=True)


async def main(settings: GatingSettings) -> None:
    from shared.logs import configure_logging
    from shared.metrics_http import serve_metrics
    from shared.runtime import connect, serve_until_stopped

    configure_logging(settings.log_level, settings.log_format, service="gating", node=settings.node)
    use_threads(settings.inline_threads, settings.compute_threads)
    inference_only()
    nc = await connect(settings, f"gating-{settings.node}")
    gating = build(nc, settings)
    async with serve_metrics(gating.registry, settings.metrics_bind, settings.metrics_port, "gating"):
        await serve_until_stopped(gating.start(), gating.stop, nc)


def main_cli() -> None:
    from shared.runtime import run_service

    run_service(GatingSettings, main, "gating")
