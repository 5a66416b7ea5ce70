"""The API's side of the NATS contract: read the gatings' load, stream one generation, cancel it.

One generation is one `prism.v1.infer.<node>` request with `stream: true` and its own inbox; the
gating answers TokenChunks, then one FinalReply or one ErrorReply. A generation that the API gives up
(client gone, stop string seen, timeout) is cancelled on `prism.v1.infer.<node>.cancel` with its inbox,
which frees its batch slot in the gating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import ValidationError

from services.api.protocol import ApiError
from services.api.routing import least_loaded, parse_loads
from services.api.settings import ApiSettings
from shared import subjects
from shared.schemas import ErrorReply, FinalReply, GatingLoad, TokenChunk

log = structlog.get_logger()


@dataclass(frozen=True)
class Piece:
    """One generated token's text (may be "" while a character is incomplete)."""

    text: str


class Generation:
    """One streaming request on a node; `next()` → Piece or FinalReply; ApiError on an error reply."""

    def __init__(self, gateway: Gateway, node: str, sub: Subscription, replies: asyncio.Queue[Msg],
                 timeout_s: float) -> None:
        self.gateway, self.node, self._sub, self._replies, self.timeout_s = gateway, node, sub, replies, timeout_s
        self.finished = False
        self.tokens = 0  # TokenChunks received

    async def next(self) -> Piece | FinalReply:
        try:
            async with asyncio.timeout(self.timeout_s):  # not next_msg: it spawns two tasks per message
                msg = await self._replies.get()
        except TimeoutError:
            self.abandon()
            raise ApiError(504, "timeout", f"node {self.node} sent nothing for {self.timeout_s:g} s") from None
        return self._parse(msg)

    def next_nowait(self) -> Piece | FinalReply | None:
        """The next reply if one has arrived already, else None (lets a busy stream join queued tokens)."""
        try:
            msg = self._replies.get_nowait()
        except asyncio.QueueEmpty:
            return None
        return self._parse(msg)

    def _parse(self, msg: Msg) -> Piece | FinalReply:
        if not msg.data and (msg.headers or {}).get("Status") == "503":
            self._end()
            raise ApiError(503, "no_responders", f"no gating serves node {self.node!r}")
        if b'"done"' not in msg.data:  # most replies: a token (validated straight from JSON)
            try:
                chunk = TokenChunk.model_validate_json(msg.data)
                self.tokens += 1
                return Piece(chunk.text)
            except ValidationError:
                pass  # reported below with the others
        data = _json(msg.data)
        try:
            if "error" in data:
                self._end()
                err = ErrorReply.model_validate(data).error
                raise ApiError.from_gating(err.code, err.message, self.gateway.settings.retry_after_s)
            if data.get("done"):
                self._end()
                return FinalReply.model_validate(data)
            chunk = TokenChunk.model_validate(data)
        except ValidationError as exc:
            self.abandon()
            why = exc.errors()[0]["msg"]
            raise ApiError(502, "bad_reply", f"the gating's reply breaks the contract: {why}") from None
        self.tokens += 1
        return Piece(chunk.text)

    def abandon(self) -> None:
        """Stop the generation if it still runs (cancel on the gating), and stop listening."""
        if not self.finished:
            self.gateway.cancel_soon(self.node, self._sub.subject)
        self._end()

    def _end(self) -> None:
        if not self.finished:
            self.finished = True
            self.gateway.spawn(self._sub.unsubscribe())


def _json(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ApiError(502, "bad_reply", f"the gating's reply is not a JSON object: {payload[:100]!r}")
    return data


class Gateway:
    def __init__(self, nc: NatsClient, settings: ApiSettings) -> None:
        self.nc = nc
        self.settings = settings
        self.loads: dict[str, GatingLoad] = {}
        self.pending: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._poller = asyncio.create_task(self._poll(), name="gating-loads")

    async def stop(self) -> None:
        if self._poller:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)  # cancels already published go out

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval_s)
            with contextlib.suppress(Exception):  # a missed reading is replaced by the next one
                await self.refresh()

    async def refresh(self) -> None:
        """Read every gating's load from `$SRV.STATS.prism-gating` (answers within `stats_wait_s`)."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        replies: list[dict[str, Any]] = []
        try:
            await self.nc.publish(f"$SRV.STATS.{subjects.SERVICE_GATING}", b"", reply=inbox)
            deadline = time.monotonic() + self.settings.stats_wait_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except NatsTimeoutError:
                    break
                with contextlib.suppress(ValueError):
                    replies.append(json.loads(msg.data))
        finally:
            await sub.unsubscribe()
        self.loads, self.pending = parse_loads([r for r in replies if isinstance(r, dict)]), {}

    async def pick(self, header: str | None) -> str:
        """The node for a request: `X-Prism-Node`, else the configured node, else the least loaded."""
        if header is not None:
            if not subjects.is_token(header):
                raise ApiError(400, "invalid_request", "X-Prism-Node must be 1-64 of A-Z a-z 0-9 _ -",
                               param="X-Prism-Node")
            return header
        if self.settings.node:
            return self.settings.node
        if not self.loads:
            await self.refresh()
        node = least_loaded(self.loads, self.pending)
        if node is None:
            raise ApiError(503, "no_responders", "no gating answered; is `prism up` running?")
        return node

    async def open(self, node: str, request: dict[str, Any]) -> Generation:
        """Send one streaming request to `node`; its replies arrive on the Generation."""
        inbox = self.nc.new_inbox()
        replies: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_reply(msg: Msg) -> None:
            replies.put_nowait(msg)

        sub = await self.nc.subscribe(inbox, cb=on_reply)
        self.pending[node] = self.pending.get(node, 0) + 1
        await self.nc.publish(subjects.infer(node), json.dumps({**request, "stream": True}).encode(), reply=inbox)
        return Generation(self, node, sub, replies, self.settings.request_timeout_s)

    def cancel_soon(self, node: str, reply_to: str) -> None:
        """Cancel the request of `node` replying to `reply_to`, without waiting (a client may be gone)."""
        payload = json.dumps({"reply_to": reply_to}).encode()
        log.info("generation_cancelled", node=node)
        self.spawn(self.nc.publish(subjects.cancel(node), payload))

    def spawn(self, coro: Any) -> None:
        """Run `coro` in the background, kept until done (cleanup that must outlive its caller)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

