"""Continuous batching: every active sequence advances in one forward step; new ones join at step boundaries.

The engine owns the dense model, its slot-based KV cache and the sampler. It knows nothing of NATS:
routed experts are an async callable (`ExpertsFn`), so the same engine runs against remote hosts in
the service and against in-process experts in tests. A step of more than `inline_max_tokens` tokens
runs its model compute on one worker thread (the generator of `forward_steps` is resumed there) so the
event loop stays free for intake and replies; smaller steps, most decode steps, run inline, where a
thread hop would cost more than the compute.

With a route (services/gating/routes.py) some layers run on other nodes: the step's generator yields a
`Hop` per chain of them, answered by `hops` (an async callable, as `experts` is); a step batches the
sequences of one route, so while routes change the engine runs one step per route in use.

A sequence whose expert failed is finished with that error after the step; the others in the same
step are unaffected (attention is per sequence, experts are per token), and its tokens are left out of
later layers' expert calls so a dead expert costs one timeout per step, not one per layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import structlog
import torch
from torch import Tensor

from services.gating.routes import Hop, Route, route_steps
from shared.activations import StepLoad
from shared.errors import Overloaded, PrismError
from shared.model.inference import executor, inference
from shared.model.model import Batch, MoEModel
from shared.model.moe import MoECall, Routing
from shared.model.sampling import Sampler, SamplingParams

log = structlog.get_logger()

ExpertsFn = Callable[[MoECall, Tensor | None], Awaitable["ExpertsResult"]]
"""(call, live [T] bool or None for all) -> combined output of the live tokens and which tokens failed."""

Y = TypeVar("Y")  # what a forward generator yields

class Streams(Protocol):
    """Who shares the node's expert dispatch (services/gating/lockstep.py): a step computes inside
    `stream()`, and is `paused()` while it waits for a hop."""

    def stream(self) -> AbstractContextManager[None]: ...

    def paused(self) -> AbstractContextManager[None]: ...


class Alone:
    """`Streams` of a step that shares its dispatch with nobody (an engine or runner on its own)."""

    def stream(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def paused(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()


HopsFn = Callable[[Hop, list[str]], Awaitable[Tensor]]
"""(hop, ids of the step's sequences) -> x [T, D] after the hop's chain; raises PrismError when it failed."""


@dataclass(frozen=True)
class ExpertsResult:
    output: Tensor  # [T, D] combined routed output (rows of failed or dead tokens are garbage)
    failed: Tensor | None  # [T] bool, tokens whose expert did not answer; None: every one answered
    error: PrismError | None = None  # why, when any token failed
    local_s: float = 0.0  # computing experts embedded in this process
    remote_wait_s: float = 0.0  # waiting on remote experts once the local ones were done
    routing: Routing | None = None  # the call's choices as the experts function sorted them, if it did


@dataclass
class StepTime:
    """Seconds one step spent in routed-expert calls (and how they split), and waiting on hops."""

    wait_s: float = 0.0  # the whole expert calls
    local_s: float = 0.0  # computing embedded experts
    remote_wait_s: float = 0.0  # waiting on remote ones after that
    hop_wait_s: float = 0.0  # on a route: from sending a hop to its chain's answer
    dense_s: float = 0.0  # the model's own compute here (embedding, attention, routers, head)
    moe_layers: int = 0  # MoE layers run here (their expert calls)

    def add(self, wait_s: float, result: ExpertsResult) -> None:
        self.wait_s += wait_s
        self.local_s += result.local_s
        self.remote_wait_s += result.remote_wait_s


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    index: int
    last: bool = False  # the sequence ends with this token (a DoneEvent follows)


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: Literal["length", "stop"]


@dataclass(frozen=True)
class ErrorEvent:
    error: PrismError


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass
class Sequence:
    """One request inside the engine. Its events arrive on `events`: a TokenEvent per token when
    `stream`, and always one DoneEvent or ErrorEvent last (a reader that wants only the result is
    not woken per token)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    key: int = field(default_factory=itertools.count().__next__)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    first_token: float = 0.0
    finished: float = 0.0
    expert_wait_s: float = 0.0
    local_experts_s: float = 0.0
    remote_wait_s: float = 0.0
    hop_wait_s: float = 0.0
    error: PrismError | None = None
    route: Route | None = None  # executing node per layer, fixed for the sequence's life; None: all at home
    stream: bool = True
    cancelled: PrismError | None = None  # its requester asked to stop it (`Engine.cancel`)

    def next_tokens(self) -> list[int]:
        return self.prompt if not self.generated else self.generated[-1:]


class Engine:
    def __init__(
        self,
        model: MoEModel,
        experts: ExpertsFn,
        *,
        max_slots: int,
        max_len: int,
        max_queue: int,
        inline_max_tokens: int = 0,
        stop_ids: frozenset[int] = frozenset(),
        home: str = "",
        hops: HopsFn | None = None,
        on_finish: Callable[[Sequence], None] | None = None,
        streams: Streams | None = None,
    ) -> None:
        self.model = model
        self.experts = experts
        self.streams = streams or Alone()
        self.home = home
        self.hops = hops
        self.on_finish = on_finish  # e.g. tell the nodes on its route to free its KV
        self.max_len = max_len
        self.max_queue = max_queue
        self.inline_max_tokens = inline_max_tokens
        self.stop_ids = stop_ids
        self.cache = model.new_cache(max_slots, max_len)
        self.sampler = Sampler()
        self.active: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self._wake = asyncio.Event()
        self._executor = executor("dense")
        self.steps = 0
        self.load = StepLoad()  # this node's own steps, for the activation reports

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; it joins the batch at the next step boundary."""
        if len(self.waiting) >= self.max_queue:
            raise Overloaded(f"{len(self.waiting)} requests are already waiting; retry later")
        self.waiting.append(seq)
        self._wake.set()

    async def run(self) -> None:
        """Step forever (cancel to stop). A step that crashes fails its sequences, not the engine."""
        while True:
            if not self.active and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
            self._admit()
            if not self.active:
                continue
            try:
                await self.step()
            except Exception:  # a bug must not take every future request down with it
                log.exception("step_failed")
                for seq in list(self.active):  # the details go to the log, not to callers
                    self._finish(seq, ErrorEvent(PrismError("internal error in the forward step")))

    def _admit(self) -> None:
        now = time.perf_counter()
        while self.waiting and self.cache.num_free() > 0:
            seq = self.waiting.popleft()
            seq.slot = self.cache.allocate()
            seq.admitted = now
            self.active.append(seq)

    def cancel(self, seq: Sequence, err: PrismError) -> bool:
        """Stop `seq` with `err`: at once while it waits; at the next step boundary while it runs (a step in
        flight still holds its slot). False when it is already finished or cancelled; it is marked
        `cancelled` all the same (its reply may not be sent yet: it is answered so, never started again)."""
        seq.cancelled = err
        if seq in self.waiting:
            self.waiting.remove(seq)
            seq.events.put_nowait(ErrorEvent(err))
            return True
        if seq in self.active and seq.error is None:
            seq.error = err  # retired like a sequence whose expert failed
            self._wake.set()
            return True
        return False

    async def step(self) -> None:
        """One forward step over every active sequence (one per route in use), then sample and retire
        finished ones."""
        for seq in list(self.active):
            if seq.error is not None:  # cancelled between steps: its slot is free before the batch forms
                self._finish(seq, ErrorEvent(seq.error))
        by_route: dict[Route | None, list[Sequence]] = {}
        for seq in self.active:
            by_route.setdefault(seq.route, []).append(seq)
        for seqs in by_route.values():
            await self._step(seqs)

    async def _step(self, batch_seqs: list[Sequence]) -> None:
        batch = Batch(slots=[s.slot for s in batch_seqs], tokens=[s.next_tokens() for s in batch_seqs])
        try:
            logits, spent = await self._forward(batch, batch_seqs)
        except PrismError as err:
            for seq in batch_seqs:
                self._finish(seq, ErrorEvent(err))
            return
        self.steps += 1
        self.load.add(len(batch_seqs), spent.dense_s, spent.moe_layers)
        for i, seq in enumerate(batch_seqs):
            seq.expert_wait_s += spent.wait_s
            seq.local_experts_s += spent.local_s
            seq.remote_wait_s += spent.remote_wait_s
            seq.hop_wait_s += spent.hop_wait_s
            if seq.error is not None:
                self._finish(seq, ErrorEvent(seq.error))
                continue
            try:
                self._advance(seq, logits[i])
            except Exception:  # one sequence's sampling must not fail the others of the step
                log.exception("sampling_failed", params=str(seq.params))
                self._finish(seq, ErrorEvent(PrismError("internal error while sampling")))

    async def _forward(self, batch: Batch, seqs: list[Sequence]) -> tuple[Tensor, StepTime]:
        route = seqs[0].route
        steps: Generator[MoECall | Hop, Tensor, Tensor] = (
            route_steps(self.model, batch, self.cache, route, self.home) if route else
            self.model.forward_steps(batch, self.cache)
        )
        spent = StepTime()
        with self.streams.stream():
            logits = await self._drive(steps, seqs, [len(t) for t in batch.tokens], spent)
        return logits, spent

    async def _drive(
        self, steps: Generator[MoECall | Hop, Tensor, Tensor], seqs: list[Sequence], counts: list[int],
        spent: StepTime,
    ) -> Tensor:
        """Run the step's generator to its logits, answering its expert calls and hops (`counts`: each
        sequence's new tokens)."""
        inline = sum(counts) <= self.inline_max_tokens
        live: Tensor | None = None  # [T] tokens of sequences still going, once one has failed; None: all
        call, logits = await self._compute(inline, steps, None, spent)
        while call is not None:
            started = time.perf_counter()
            if isinstance(call, Hop):
                with self.streams.paused():
                    output = await self._hop(call, seqs)
                spent.hop_wait_s += time.perf_counter() - started
                if seqs[0].error is not None:  # the chain failed, and with it every sequence of the step
                    live = live_rows([seq.error is None for seq in seqs], counts)
            else:
                spent.moe_layers += 1
                result = await self.experts(call, live)
                spent.add(time.perf_counter() - started, result)
                if result.error is not None:
                    self._mark_failed(result, seqs, counts)
                    live = live_rows([seq.error is None for seq in seqs], counts)
                output = result.output
            call, logits = await self._compute(inline, steps, output, spent)
        assert logits is not None  # the generator returned
        return logits

    async def _hop(self, hop: Hop, seqs: list[Sequence]) -> Tensor:
        """x after the hop's chain; when it fails, every sequence of the step fails with its error (the
        chain ran them all) and the step goes on with x unchanged, to be discarded."""
        try:
            if self.hops is None:
                raise PrismError("this engine has no way to reach other nodes on a route")
            return await self.hops(hop, [seq_id(self.home, s) for s in seqs])
        except PrismError as err:
            for seq in seqs:
                seq.error = seq.error or err
            return hop.hidden

    async def _compute(
        self, inline: bool, steps: Generator[MoECall | Hop, Tensor, Tensor], value: Tensor | None, spent: StepTime
    ) -> tuple[MoECall | Hop | None, Tensor | None]:
        """Run dense compute up to the next MoE call: inline for small steps (a thread hop costs more
        than the math), on the worker thread for big ones so intake and replies keep flowing."""
        started = time.perf_counter()
        if inline:
            out = resume(steps, value)
        else:
            out = await asyncio.get_running_loop().run_in_executor(self._executor, resume, steps, value)
        spent.dense_s += time.perf_counter() - started
        return out

    @staticmethod
    def _mark_failed(result: ExpertsResult, seqs: list[Sequence], counts: list[int]) -> None:
        """The sequences whose tokens failed in `result` fail with its error."""
        assert result.failed is not None  # with an error
        for seq, bad in zip(seqs, failed_items(result.failed, counts), strict=True):
            if bad and seq.error is None:
                seq.error = result.error

    def _advance(self, seq: Sequence, logits: Tensor) -> None:
        token = self.sampler.sample(logits, seq.params, key=seq.key)
        if not seq.generated:
            seq.first_token = time.perf_counter()
        seq.generated.append(token)
        done: DoneEvent | None = None
        if token in self.stop_ids:
            done = DoneEvent("stop")
        elif len(seq.generated) >= seq.max_tokens or len(seq.prompt) + len(seq.generated) >= self.max_len:
            done = DoneEvent("length")
        if seq.stream:
            seq.events.put_nowait(TokenEvent(token, len(seq.generated) - 1, last=done is not None))
        if done is not None:
            self._finish(seq, done)

    def _finish(self, seq: Sequence, event: Event) -> None:
        seq.finished = time.perf_counter()
        self.load.finished += 1
        self.active.remove(seq)
        self.cache.free(seq.slot)
        self.sampler.release(seq.key)
        seq.events.put_nowait(event)
        if self.on_finish is not None and seq.route is not None:
            self.on_finish(seq)

    def abort(self, err: PrismError) -> None:
        """Finish every running and waiting sequence with `err` (call it once `run` has stopped)."""
        for seq in list(self.active):
            self._finish(seq, ErrorEvent(err))
        while self.waiting:
            self.waiting.popleft().events.put_nowait(ErrorEvent(err))

    def close(self) -> None:
        self._executor.shutdown(wait=False)


def failed_items(failed: Tensor | None, counts: list[int]) -> list[bool]:
    """Per item (`counts[i]` rows each, in turn: a step's sequences, a batch's segments), whether any of
    its rows is marked in `failed` [T] (every item when None: the whole call failed)."""
    if failed is None:
        return [True] * len(counts)
    return [bool(part.any()) for part in torch.split(failed, counts)]


def live_rows(going: list[bool], counts: list[int]) -> Tensor:
    """[T] bool: `counts[i]` rows per item in turn, True where item i is still going (a step's sequences,
    a batch's segments)."""
    return torch.tensor(going).repeat_interleave(torch.tensor(counts))


def seq_id(home: str, seq: Sequence) -> str:
    """A sequence's name on the nodes of its route: its home and its key there."""
    return f"{home}/{seq.key}"


def resume(steps: Generator[Y, Tensor, Tensor], value: Tensor | None) -> tuple[Y | None, Tensor | None]:
    """Advance a forward generator (perhaps on a worker thread): (next yield, None) or (None, result).

    StopIteration cannot cross a Future, so the generator's return value is unpacked here.
    """
    try:
        with inference():  # no autograd bookkeeping per op: ~3% of a small decode step
            return steps.send(value), None  # type: ignore[arg-type]  # the first send must be None
    except StopIteration as done:
        return None, done.value
