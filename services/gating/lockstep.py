"""One dispatch per MoE layer for a node's own step and the route segments it runs for other nodes.

A node runs several *streams* of forward work at once: its own step (engine.py) and the segments of
other nodes' routes (segments.py). Their KV caches, step contexts and layer ranges differ, so each
drives its own layers; what they can share is the expert dispatch, where batching pays: one message
per remote host instead of one per stream, one block per embedded expert. So the node's experts
function is wrapped here:

- a call made while no other stream is computing goes straight to the dispatcher (batch 1 pays
  nothing);
- otherwise it is held to the end of the current event-loop turn: every stream that is ready in that
  turn computes its dense part up to its next MoE call, and the calls for one layer leave as one
  (rows concatenated, results split back);
- a call that another computing stream is one MoE layer short of (that stream's last call was the
  layer before) waits for it, at most `CATCH_UP_S`: the two meet there and, in lockstep from then on
  (the own step and a segment over the same layers, which the pipeline's ranges are once a dense first
  layer is left out), share every layer after. A stream that leaves its range, waits for a hop or does
  not come in time keeps nobody waiting; a stream further behind is not waited for.

A stream is computing from `stream()`'s entry to its exit, except while `paused()` (the own step
waiting for a hop's chain). Activation counts stay per part (a segment's tokens count at its home).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor

from services.gating.dispatch import NodeExperts
from services.gating.engine import ExpertsResult
from shared.model.moe import MoECall

CATCH_UP_S = 0.002
"""Longest a held call waits for a stream one MoE layer behind it: once they meet they share every layer
after, and a stream computes a layer in well under this on the machines measured."""


@dataclass
class _Part:
    call: MoECall
    live: Tensor | None
    counted: bool
    answer: asyncio.Future[ExpertsResult]
    stream: asyncio.Task[object] | None
    since: float


class _Stream:
    """`Lockstep.stream()`: a class, not a generator, since every forward step enters one."""

    __slots__ = ("lockstep", "task")

    def __init__(self, lockstep: Lockstep) -> None:
        self.lockstep = lockstep
        self.task: asyncio.Task[object] | None = None

    def __enter__(self) -> None:
        self.task = asyncio.current_task()
        at = self.lockstep._at
        for other in at:  # a lone stream's calls are not tracked: where it stands is unknown until its next
            at[other] = -1
        at[self.task] = -1

    def __exit__(self, *exc: object) -> None:
        del self.lockstep._at[self.task]
        self.lockstep._nudge()


class Lockstep:
    """The node's experts function for all its streams; see the module docstring."""

    def __init__(self, experts: NodeExperts, moe_layers: list[int]) -> None:
        self.experts = experts
        self.before = dict(zip(moe_layers[1:], moe_layers, strict=False))  # MoE layer -> the MoE layer before it
        self.shared_dispatches = 0  # dispatches that carried the calls of more than one stream
        self.shared_parts = 0  # the calls they carried
        self._at: dict[asyncio.Task[object] | None, int] = {}  # computing streams -> the layer of their last call
        self._held: dict[int, list[_Part]] = {}  # layer -> calls waiting for the end of this loop turn
        self._release_due = False
        self._dispatches: set[asyncio.Task[None]] = set()

    def stream(self) -> AbstractContextManager[None]:
        """A stream of forward work (one task) computes inside this block."""
        return _Stream(self)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside `stream()`: this stream waits for something other than its experts (a hop)."""
        me = asyncio.current_task()
        layer = self._at.pop(me)
        self._nudge()  # a call held for this stream need not wait for it
        try:
            yield
        finally:
            self._at[me] = layer

    def counted(self, call: MoECall, live: Tensor | None) -> Awaitable[ExpertsResult]:
        """For the node's own step: its tokens count in this node's activation statistics."""
        if len(self._at) <= 1 and not self._held:  # nobody to share with: the dispatcher's own coroutine
            return self.experts(call, live)
        return self._held_call(call, live, counted=True)

    def uncounted(self, call: MoECall, live: Tensor | None) -> Awaitable[ExpertsResult]:
        """For other nodes' segments: their homes count them."""
        if len(self._at) <= 1 and not self._held:
            return self.experts.uncounted(call, live)
        return self._held_call(call, live, counted=False)

    async def _held_call(self, call: MoECall, live: Tensor | None, *, counted: bool) -> ExpertsResult:
        me = asyncio.current_task()
        if me in self._at:
            self._at[me] = call.layer
        loop = asyncio.get_running_loop()
        part = _Part(call, live, counted, loop.create_future(), me, loop.time())
        self._held.setdefault(call.layer, []).append(part)
        self._nudge()  # after the callbacks ready now: the other streams of this turn
        return await part.answer

    def _nudge(self) -> None:
        if self._held and not self._release_due:
            self._release_due = True
            asyncio.get_running_loop().call_soon(self._release)

    def _release(self) -> None:
        """Dispatch the held calls, one dispatch per layer, except a layer some stream is one MoE layer
        short of (for at most CATCH_UP_S): its calls wait for that stream to join them."""
        self._release_due = False
        loop = asyncio.get_running_loop()
        held, self._held = self._held, {}
        for layer, parts in held.items():
            if loop.time() - parts[0].since < CATCH_UP_S and self._behind(layer, parts):
                self._held[layer] = parts
                continue
            task = asyncio.ensure_future(self._dispatch(parts))
            self._dispatches.add(task)
            task.add_done_callback(self._dispatches.discard)
        if self._held:  # the stream behind may never come (its range ends): look again when the wait is up
            loop.call_later(CATCH_UP_S, self._nudge)

    def _behind(self, layer: int, parts: list[_Part]) -> bool:
        """Whether a computing stream other than these calls' last called the MoE layer before `layer`."""
        before = self.before.get(layer)
        mine = {part.stream for part in parts}
        return before is not None and any(at == before and s not in mine for s, at in self._at.items())

    async def _dispatch(self, parts: list[_Part]) -> None:
        try:
            if len(parts) == 1:
                (part,) = parts
                dispatch = self.experts if part.counted else self.experts.uncounted
                results = [await dispatch(part.call, part.live)]
            else:
                results = await self._shared(parts)
        except BaseException as exc:  # the streams get it as if they had called alone
            for part in parts:
                if not part.answer.done():
                    part.answer.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for part, result in zip(parts, results, strict=True):
            if not part.answer.done():  # its stream may have been cancelled meanwhile
                part.answer.set_result(result)

    async def _shared(self, parts: list[_Part]) -> list[ExpertsResult]:
        """One dispatch for several streams' calls of one layer; each gets its rows of the result."""
        for part in parts:
            if part.counted:
                self.experts.count(part.call, part.live)
        sizes = [part.call.hidden.shape[0] for part in parts]
        call = MoECall(
            parts[0].call.layer,
            torch.cat([part.call.hidden for part in parts]),
            torch.cat([part.call.expert_ids for part in parts]),
            torch.cat([part.call.weights for part in parts]),
        )
        live = None
        if any(part.live is not None for part in parts):
            live = torch.cat([torch.ones(n, dtype=torch.bool) if p.live is None else p.live
                              for p, n in zip(parts, sizes, strict=True)])
        result = await self.experts.uncounted(call, live)
        self.shared_dispatches += 1
        self.shared_parts += len(parts)
        outputs = torch.split(result.output, sizes)
        failed = torch.split(result.failed, sizes) if result.failed is not None else [None] * len(parts)
        return [
            ExpertsResult(out, bad, result.error if bad is not None and bool(bad.any()) else None,
                          result.local_s, result.remote_wait_s)
            for out, bad in zip(outputs, failed, strict=True)
        ]
