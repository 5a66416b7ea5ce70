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
  (rows concatenated, results split back). Streams in lockstep (the own step and a segment over the
  same layers, which the pipeline's ranges are once a dense first layer is left out) then stay merged
  layer after layer. No stream waits for another's dense compute or network: a stream that reaches a
  layer in a later turn goes alone.

A stream is computing from `stream()`'s entry to its exit, except while `paused()` (the own step
waiting for a hop's chain). Activation counts stay per part (a segment's tokens count at its home).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from services.gating.dispatch import NodeExperts
from services.gating.engine import ExpertsResult
from shared.model.moe import MoECall


@dataclass
class _Part:
    call: MoECall
    live: Tensor | None
    counted: bool
    answer: asyncio.Future[ExpertsResult]


class Lockstep:
    """The node's experts function for all its streams; see the module docstring."""

    def __init__(self, experts: NodeExperts) -> None:
        self.experts = experts
        self.computing = 0  # streams between `stream()` entry and exit, not paused
        self.shared_dispatches = 0  # dispatches that carried the calls of more than one stream
        self.shared_parts = 0  # the calls they carried
        self._held: dict[int, list[_Part]] = {}  # layer -> calls waiting for the end of this loop turn
        self._dispatches: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """A stream of forward work computes inside this block."""
        self.computing += 1
        try:
            yield
        finally:
            self.computing -= 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside `stream()`: this stream waits for something other than its experts (a hop)."""
        self.computing -= 1
        try:
            yield
        finally:
            self.computing += 1

    async def counted(self, call: MoECall, live: Tensor | None) -> ExpertsResult:
        """For the node's own step: its tokens count in this node's activation statistics."""
        return await self._call(call, live, counted=True)

    async def uncounted(self, call: MoECall, live: Tensor | None) -> ExpertsResult:
        """For other nodes' segments: their homes count them."""
        return await self._call(call, live, counted=False)

    async def _call(self, call: MoECall, live: Tensor | None, *, counted: bool) -> ExpertsResult:
        if self.computing <= 1 and not self._held:  # nobody to share with
            return await (self.experts(call, live) if counted else self.experts.uncounted(call, live))
        loop = asyncio.get_running_loop()
        if not self._held:
            loop.call_soon(self._release)  # after the callbacks ready now: the other streams of this turn
        part = _Part(call, live, counted, loop.create_future())
        self._held.setdefault(call.layer, []).append(part)
        return await part.answer

    def _release(self) -> None:
        held, self._held = self._held, {}
        for parts in held.values():
            task = asyncio.ensure_future(self._dispatch(parts))
            self._dispatches.add(task)
            task.add_done_callback(self._dispatches.discard)

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
