"""The bus side of routes: a home's hops out, other nodes' segments in, one way along each chain.

Home: `RouteHops` sends a step's hidden states to the first node of a chain as a request on
`prism.v1.route.<node>.segment`; the reply (x after the chain) comes from the chain's last node.
Executing node: `SegmentService` runs its segment (services/gating/segments.py), then publishes x to
the next node of the chain *with the home's reply subject*, so the hidden states hop one way from node
to node and only the last hop goes home; an error anywhere is answered straight to the home. When a
home finishes a request it publishes its id on `prism.v1.route.<node>.release` of each node on the
route, which frees the request's KV there. A gating without a fixed route follows the plan's:
`watch_plans` feeds the plans to route_plan.RouteFollower (and the measured links to the host
directory), `watch_plan_events` the migrator's events.

Failure: a chain that does not answer within the hop's deadline, or whose first node has no
subscriber, fails the step's requests with `route_unavailable`; an expert that fails on an executing
node fails them with `expert_unavailable`, as at home.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from torch import Tensor

from services.gating.route_plan import RouteFollower
from services.gating.routes import Hop, Segment
from services.gating.segments import SegmentRequest, SegmentResult, SegmentRunner
from shared import subjects
from shared.activations import ActivationCounter
from shared.codec import check_size, decode_tensor, encode_tensor
from shared.errors import BadSegment, PrismError, RouteNotServing, RouteUnavailable, ShuttingDown, error_from_headers

log = structlog.get_logger()


class RouteHops:
    """The home's side: `await hops(hop, seq_ids)` -> x [T, D] after the hop's chain."""

    def __init__(
        self, nc: NatsClient, home: str, *, layer_timeout_s: float, max_payload: int,
        counter: ActivationCounter | None = None,
    ) -> None:
        self.nc = nc
        self.home = home
        self.counter = counter  # the home's activation counts: the chain's layers count here
        self.layer_timeout_s = layer_timeout_s
        self.max_payload = max_payload
        self.sent = 0  # chains sent
        self.wait_s = 0.0  # from sending them to their answers (or failures)

    async def __call__(self, hop: Hop, seq_ids: list[str]) -> Tensor:
        meta = {"home": self.home, "seqs": seq_ids, "counts": hop.counts, "lens": hop.lens,
                "chain": [seg.as_list() for seg in hop.chain]}
        payload = encode_tensor(hop.hidden, meta)
        check_size(payload, None, self.max_payload)
        first = hop.chain[0].node
        nodes = ", ".join(seg.node for seg in hop.chain)
        # each layer of the chain may wait up to the expert timeout, and the hops cost little besides
        timeout_s = self.layer_timeout_s * (len(hop.chain) + 1)
        self.sent += 1
        started = time.perf_counter()
        try:
            msg = await self.nc.request(subjects.route_segment(first), payload, timeout=timeout_s)
        except NoRespondersError:
            raise RouteNotServing(f"a node of the route through {nodes} is not serving segments") from None
        except (NatsTimeoutError, TimeoutError):
            raise RouteUnavailable(f"the route through {nodes} did not answer within {timeout_s:g} s") from None
        finally:
            self.wait_s += time.perf_counter() - started
        error = error_from_headers(msg.headers)
        if isinstance(error, BadSegment):  # e.g. a node restarted and lost this request's KV: its route is gone
            raise RouteUnavailable(f"the route through {first} cannot go on: {error.message}")
        if error is not None:
            raise error
        try:
            x, meta = decode_tensor(msg.data)
        except PrismError as err:
            raise RouteUnavailable(f"the route through {first} answered a bad tensor: {err.message}") from None
        if x.shape != hop.hidden.shape:
            raise RouteUnavailable(f"the route through {first} answered {list(x.shape)} for {list(hop.hidden.shape)}")
        activations = meta.get("activations")
        self._count(activations if isinstance(activations, list) else [])
        return x.to(hop.hidden.dtype)

    def _count(self, activations: list[Any]) -> None:
        """Add the chain's routing choices to the home's counts; a malformed entry is dropped."""
        if self.counter is None:
            return
        for entry in activations:
            try:
                layer, experts, counts, tokens = entry
                self.counter.add(int(layer), [int(e) for e in experts], [int(c) for c in counts], tokens=int(tokens))
            except (TypeError, ValueError, KeyError, IndexError):
                log.warning("segment_activations_dropped", home=self.home)

    async def release(self, seq_id: str, nodes: Iterable[str]) -> None:
        """Tell the nodes that keep KV for `seq_id` that it is done."""
        body = json.dumps({"seqs": [seq_id]}).encode()
        for node in nodes:
            await self.nc.publish(subjects.route_release(node), body)


@dataclass(frozen=True)
class _Pending:
    """A checked segment waiting for the node's segment loop."""

    reply: str
    hidden: Tensor
    req: SegmentRequest
    meta: dict[str, Any]

    @property
    def span(self) -> tuple[int, int]:
        return self.req.chain[0].start, self.req.chain[0].end


class SegmentService:
    """The executing node's side: answers segments and releases for `runner`."""

    def __init__(self, nc: NatsClient, runner: SegmentRunner, *, hidden_size: int, max_payload: int) -> None:
        self.nc = nc
        self.runner = runner
        self.hidden_size = hidden_size
        self.max_payload = max_payload
        self.errors = 0
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()

    async def on_segment(self, msg: Msg) -> None:
        """Check a segment and queue it; `serve` runs it with whatever else of its layer range waits."""
        if not msg.reply:  # nobody waits for the result: running it would only hold KV
            log.warning("segment_without_reply", node=self.runner.node)
            return
        try:
            hidden, meta = decode_tensor(msg.data)
            req = SegmentRequest.parse(meta, hidden, self.runner.node, self.hidden_size)
        except PrismError as err:
            await self._refuse(msg.reply, err)
            return
        self._queue.append(_Pending(msg.reply, hidden, req, meta))
        self._wake.set()

    async def serve(self) -> None:
        """Run queued segments until cancelled, one batch at a time: those of one layer range that wait
        together (from any homes) go through the layers as one batch, and what arrives meanwhile waits to
        form the next. Cancelled (the gating stops), the segments still queued or running are answered
        `shutting_down` at once, so their homes need not wait for a timeout."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    await self._run_batch(self._take_batch())
        except asyncio.CancelledError:
            while self._queue:
                await self._answer(self._queue.popleft(), self._stopping())
            raise

    def _take_batch(self) -> list[_Pending]:
        """The oldest queued segment and every other of its layer range."""
        span = self._queue[0].span
        batch = [p for p in self._queue if p.span == span]
        self._queue = deque(p for p in self._queue if p.span != span)
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            results = await self.runner.run_many([(p.hidden, p.req) for p in batch])
        except asyncio.CancelledError:
            for p in batch:
                await self._answer(p, self._stopping())
            raise
        except Exception:  # a bug costs these segments, answered, not the node
            log.exception("segment_failed", node=self.runner.node)
            results = [PrismError(f"node {self.runner.node} failed on this segment")] * len(batch)
        for p, result in zip(batch, results, strict=True):
            await self._answer(p, result)

    def _stopping(self) -> ShuttingDown:
        return ShuttingDown(f"node {self.runner.node} is shutting down")

    async def _answer(self, p: _Pending, result: SegmentResult | PrismError) -> None:
        """A segment's result on to its next node or home, or the error straight home."""
        try:
            if isinstance(result, PrismError):
                raise result
            x, activations = result
            chain = p.meta.get("activations", [])
            meta = {**p.meta, "activations": [*(chain if isinstance(chain, list) else []), *activations]}
            await self._forward(x, p.req, meta, p.reply)
        except PrismError as err:
            await self._refuse(p.reply, err)

    async def _forward(self, x: Tensor, req: SegmentRequest, meta: dict[str, Any], reply: str) -> None:
        """x on to the chain's next node with the home's reply subject, or home if this was the last."""
        rest: list[Segment] = req.chain[1:]
        if not rest:
            await self.nc.publish(reply, encode_tensor(x, {"activations": meta["activations"]}))
            return
        payload = encode_tensor(x, {**meta, "chain": [seg.as_list() for seg in rest]})
        check_size(payload, None, self.max_payload)
        await self.nc.publish(subjects.route_segment(rest[0].node), payload, reply=reply)

    async def _refuse(self, reply: str, err: PrismError) -> None:
        self.errors += 1
        log.warning("segment_refused", node=self.runner.node, code=err.code, error=err.message)
        await self.nc.publish(reply, json.dumps({"error": {"code": err.code, "message": err.message}}).encode(),
                              headers=err.headers())

    async def on_release(self, msg: Msg) -> None:
        try:
            seqs = json.loads(msg.data)["seqs"]
            if not isinstance(seqs, list):
                raise TypeError("seqs must be a list")
            self.runner.release([str(s) for s in seqs])
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("release_refused", node=self.runner.node, error=str(exc))



PLAN_RETRY_S = 2.0  # look for the plan bucket again after this long when it is not there


async def watch_plan_events(nc: NatsClient, follower: RouteFollower) -> Subscription:
    """`prism.v1.plan.applied` events to `follower` (a plan's route waits for its epoch's migration)."""

    async def on_event(msg: Msg) -> None:
        _feed(follower.on_applied, msg.data)

    return await nc.subscribe(subjects.PLAN_EVENTS, cb=on_event)


async def watch_plans(nc: NatsClient, bucket: str, node: str, handlers: Mapping[str, Callable[..., None]]) -> None:
    """Feed the plan bucket's keys to their handlers until cancelled: `handlers[key](value, current=...)`,
    `current` for the values found first, in force already (a later plan waits for its epoch's
    migration). Without the bucket (no control plane yet) look again every few s."""
    while True:
        try:
            js = nc.jetstream(domain=subjects.JETSTREAM_DOMAIN)
            watcher = await (await js.key_value(bucket)).watchall()
            current = True
            while True:
                with contextlib.suppress(NatsTimeoutError):
                    entry = await watcher.updates(timeout=3600)  # type: ignore[no-untyped-call]
                    if entry is None:  # the end of what was there already
                        current = False
                    elif entry.value and entry.key in handlers:
                        _feed(functools.partial(handlers[entry.key], current=current), entry.value)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no JetStream or bucket yet, or the hub went away: try again
            log.debug("plan_watch_retry", node=node, error=str(exc))
            await asyncio.sleep(PLAN_RETRY_S)


def _feed(handler: Callable[[Any], None], data: bytes) -> None:
    """JSON `data` to `handler`; what is not JSON is ignored (plans and events come from the control plane)."""
    try:
        value = json.loads(data)
    except ValueError:
        log.warning("plan_message_not_json", bytes=len(data))
        return
    handler(value)
