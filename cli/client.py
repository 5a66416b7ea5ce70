"""A small async client for Prism's public NATS contract (README, "Subjects").

It speaks only what is documented: a JSON request on `prism.v1.infer.<node>`, JSON reply chunks
`{"id", "index", "token_id", "text"}` while streaming, one final `{"done": true, ...}`, or one
error `{"done": true, "error": {"code", "message"}}`; gatings are found with nats.micro's
`$SRV.PING.prism-gating` (metadata `node`). Nothing here imports Prism's services or model.

    async with await PrismClient.connect("nats://127.0.0.1:4222") as client:
        final = await client.infer("node0", {"prompt": "Hello", "max_tokens": 8})
        async for part in client.stream("node0", {"prompt": "Hello"}):
            ...  # Chunk, then one Final
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

GATING_SERVICE = "prism-gating"  # (shared.subjects.SERVICE_GATING; this client imports nothing of Prism)


def infer_subject(node: str) -> str:
    return f"prism.v1.infer.{node}"


class InferError(Exception):
    """The service answered with an error reply, or no answer came. `code` is the contract's code
    (e.g. `invalid_request`, `expert_unavailable`), or `timeout` / `no_responders` / `bad_reply`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Chunk:
    """One streamed token."""

    index: int
    token_id: int
    text: str


@dataclass(frozen=True)
class Final:
    """The final reply; `raw` is the JSON object as received, `latency_s` measured by the client."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict[str, Any]
    timings: dict[str, Any]
    latency_s: float
    raw: dict[str, Any] = field(repr=False)


class PrismClient:
    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc

    @classmethod
    async def connect(
        cls, url: str, *, user: str | None = None, password: str | None = None, timeout_s: float = 5.0
    ) -> PrismClient:
        """Connect once (no endless reconnects: a CLI should fail fast)."""
        try:
            async with asyncio.timeout(timeout_s + 1):  # nats-py may retry the first connect
                nc = await nats.connect(
                    url,
                    user=user,
                    password=password,
                    connect_timeout=timeout_s,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.1,
                    error_cb=_ignore_error,
                )
        except (OSError, TimeoutError, NatsTimeoutError, nats.errors.Error) as exc:
            raise InferError("connection_failed", f"cannot connect to {url} ({type(exc).__name__})") from None
        return cls(nc)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> PrismClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def nodes(self, wait_s: float = 0.5) -> list[str]:
        """Nodes whose gating answers `$SRV.PING.prism-gating` within `wait_s`, first answer first."""
        found: list[str] = []
        for reply in await self.gather(f"$SRV.PING.{GATING_SERVICE}", wait_s):
            node = reply.get("metadata", {}).get("node")
            if isinstance(node, str) and node not in found:
                found.append(node)
        return found

    async def gather(self, subject: str, wait_s: float = 0.5) -> list[dict[str, Any]]:
        """Every JSON reply to one request on `subject` within `wait_s` (nats.micro discovery: each
        instance of a service answers `$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`), in arrival order."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        replies: list[dict[str, Any]] = []
        try:
            await self.nc.publish(subject, b"", reply=inbox)
            deadline = time.monotonic() + wait_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except NatsTimeoutError:
                    break
                if _is_no_responders(msg):  # the server's answer when no service listens at all
                    break
                replies.append(_json(msg.data))
        finally:
            await sub.unsubscribe()
        return replies

    async def infer(self, node: str, request: dict[str, Any], *, timeout_s: float = 60.0) -> Final:
        """One non-streaming request; raises InferError on an error reply or no answer."""
        payload = json.dumps({**request, "stream": False}).encode()
        started = time.perf_counter()
        try:
            msg = await self.nc.request(infer_subject(node), payload, timeout=timeout_s)
        except NoRespondersError:
            raise _no_responders(node) from None
        except NatsTimeoutError:
            raise InferError("timeout", f"no reply from node {node!r} within {timeout_s:g} s") from None
        part = _parse(msg, started)
        if not isinstance(part, Final):
            raise InferError("bad_reply", f"expected a final reply, got {msg.data[:200]!r}")
        return part

    async def stream(
        self, node: str, request: dict[str, Any], *, idle_timeout_s: float = 30.0
    ) -> AsyncIterator[Chunk | Final]:
        """Yield each token as it comes, then the Final; `idle_timeout_s` bounds each wait."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        started = time.perf_counter()
        try:
            await self.nc.publish(infer_subject(node), json.dumps({**request, "stream": True}).encode(), reply=inbox)
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_timeout_s)
                except NatsTimeoutError:
                    raise InferError("timeout", f"node {node!r} sent nothing for {idle_timeout_s:g} s") from None
                if _is_no_responders(msg):
                    raise _no_responders(node)
                part = _parse(msg, started)
                yield part
                if isinstance(part, Final):
                    return
        finally:
            await sub.unsubscribe()


def _parse(msg: Msg, started: float) -> Chunk | Final:
    data = _json(msg.data)
    if "error" in data:
        error = data["error"] if isinstance(data["error"], dict) else {}
        raise InferError(str(error.get("code", "unknown")), str(error.get("message", data["error"])))
    try:
        if data.get("done"):
            return Final(
                text=str(data.get("text", "")),
                token_ids=[int(t) for t in data["token_ids"]],
                finish_reason=str(data["finish_reason"]),
                usage=dict(data.get("usage", {})),
                timings=dict(data.get("timings", {})),
                latency_s=time.perf_counter() - started,
                raw=data,
            )
        return Chunk(index=int(data["index"]), token_id=int(data["token_id"]), text=str(data.get("text", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise InferError("bad_reply", f"reply does not follow the contract ({exc!r}): {msg.data[:200]!r}") from None


def _json(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InferError("bad_reply", f"reply is not JSON: {payload[:200]!r}") from None
    if not isinstance(data, dict):
        raise InferError("bad_reply", f"reply is not a JSON object: {payload[:200]!r}")
    return data


def _is_no_responders(msg: Msg) -> bool:
    return not msg.data and (msg.headers or {}).get("Status") == "503"


def _no_responders(node: str) -> InferError:
    return InferError("no_responders", f"no gating serves node {node!r} (is `prism up` running with that node?)")


async def _ignore_error(exc: Exception) -> None:
    """Connection problems surface as exceptions from connect/request; no noise from the callback."""
