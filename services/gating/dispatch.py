"""Answer one MoE call's tokens: embedded experts by a direct call, the others over NATS, overlapped.

The call's rows are one expert-sorted block (`Routing`). Experts held by an embedded host (an
`ExpertHost` in this process: the node's own devices) are computed by a direct call on the rows, with
no envelope and no broker. The rest leave first: with a host directory (host heartbeats), the rows of
all experts one host holds go to that host in one message (`prism.v1.host.<host>.calls`), local hosts
first; experts without a known holder, and any a host refuses, go to
`prism.v1.expert.<layer>.<expert>` (split to fit max_payload), where NATS picks the nearest holder in
the queue group. While they are in flight the embedded experts compute, so a layer waits
max(local compute, slowest remote), not the sum. Rows that get no answer within `timeout_s`, "no
responders", or an error reply mark their tokens failed with `expert_unavailable`; the caller
decides which requests that fails. One deadline covers a whole call: a fallback after a host that
timed out gets only what is left of it.

Counting: an *expert call* is one expert's rows in one MoE call (what an expert computes at once); a *message*
is what crosses the bus (a host message carries several expert calls).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence

import torch
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from torch import Tensor

from services.expert_host.service import ExpertHost
from services.gating.directory import HostDirectory
from services.gating.engine import ExpertsResult
from shared import subjects
from shared.activations import ActivationCounter
from shared.codec import check_size, decode_tensor, encode_tensor, max_rows_per_message
from shared.errors import ExpertUnavailable, PrismError, error_from_headers
from shared.model.moe import ExpertWeights, MoECall, Routing, combine, run_experts

NO_RESPONDERS_RETRY_S = 0.02
TURN_EVERY_S = 0.001
"""Longest a run of all-embedded calls keeps the event loop: then it yields one turn, so that other
nodes' batches, heartbeats and intake wait at most about this (plus one layer), while a small decode
step does not pay a loop turn (~12 µs on the dev machine) per layer."""

Spans = dict[int, tuple[int, int]]  # expert -> (first row, end row) in the routing's block
Answer = Tensor | PrismError


class NodeExperts:
    """The gating's `ExpertsFn`: routed experts in this process where it holds them, else over NATS."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        timeout_s: float,
        max_payload: int,
        counter: ActivationCounter | None = None,
        directory: HostDirectory | None = None,
        embedded: Sequence[ExpertHost] = (),
    ) -> None:
        self.nc = nc
        self.timeout_s = timeout_s
        self.max_payload = max_payload
        self.counter = counter
        self.directory = directory
        self.embedded = list(embedded)
        self.messages = 0  # data messages sent
        self.local_calls = 0  # expert calls computed in this process
        self.remote_calls = 0  # expert calls sent over the bus (a fallback counts again)
        self.node_calls = 0  # of those, to a host on this node by its heartbeats (metrics: local)
        self._turned = 0.0  # perf_counter of this dispatcher's last yield to the event loop
        self._holder: dict[tuple[int, int], int] | None = None  # (layer, expert) -> the embedded host computing
        # it; None: to be rebuilt (a host loaded or freed an expert)
        self._weights: dict[tuple[int, int], ExpertWeights] = {}  # (layer, expert) -> that host's weights
        for host in self.embedded:
            host.on_change.append(self._forget_holders)
        devices = {host.device for host in self.embedded}
        self._device = devices.pop() if len(devices) == 1 else None  # where every embedded host computes
        self._inline_rows = min((h.settings.inline_max_tokens for h in self.embedded), default=0)

    def __call__(self, call: MoECall, live: Tensor | None) -> Awaitable[ExpertsResult]:
        # plain functions returning the coroutine: one coroutine fewer per MoE layer
        return self._call(call, live, self.counter)

    def uncounted(self, call: MoECall, live: Tensor | None) -> Awaitable[ExpertsResult]:
        """The same, left out of this node's activation counts: a route segment run for another node,
        whose home counts it (the segment's reply carries the counts)."""
        return self._call(call, live, None)

    def count(self, call: MoECall, live: Tensor | None) -> None:
        """Count a call's choices in this node's statistics without dispatching it (for a call that
        leaves with other streams' rows, `uncounted`)."""
        if self.counter is not None:
            _count(self.counter, call, Routing.of(call.expert_ids, live))

    async def _call(self, call: MoECall, live: Tensor | None, counter: ActivationCounter | None) -> ExpertsResult:
        routing = Routing.of(call.expert_ids, live)
        if counter is not None:
            _count(counter, call, routing)
        rows = routing.rows(call.hidden)
        done = self._now(call, routing, rows) if self.embedded else None
        if done is not None:  # a decode step's layer that the embedded hosts hold: computed, no await
            return done
        local, remote = self._split(call.layer, routing.experts)
        if not remote and local:  # embedded hosts hold the whole call: compute only
            done = await self._all_local(call, routing, rows)
            if done is not None:
                return done
        spans = routing.spans
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        if not local:  # nothing to compute meanwhile: wait for the bus itself (no task, no extra loop turns)
            started = time.perf_counter()
            answers = await self._answer(call.layer, rows, spans, remote, deadline)
            return self._combine(call, routing, rows, answers, 0.0, time.perf_counter() - started)
        in_flight = asyncio.ensure_future(self._answer(call.layer, rows, spans, remote, deadline)) if remote else None
        await self._let_others_run(in_flight is not None)
        started = time.perf_counter()
        answers = await self._compute_local(call.layer, local, rows, spans, deadline)
        local_s = time.perf_counter() - started
        if in_flight is not None:
            answers += await in_flight
        remote_wait_s = time.perf_counter() - started - local_s
        return self._combine(call, routing, rows, answers, local_s, remote_wait_s)

    def _now(self, call: MoECall, routing: Routing, rows: Tensor) -> ExpertsResult | None:
        """The whole call on this thread at once, if embedded hosts hold all of it, it is small and the
        event loop had a turn lately; else None."""
        if not self._inline(rows) or time.perf_counter() - self._turned >= TURN_EVERY_S:
            return None
        return self._compute_inline(call, routing, rows)

    async def _all_local(self, call: MoECall, routing: Routing, rows: Tensor) -> ExpertsResult | None:
        """A call whose every expert an embedded host holds (a node whose hosts hold the layer, a
        route's executing node): compute only, the block's outputs in its own order, as the model in
        one process computes it. None when a host let an expert go since the split (the general path
        then asks the bus)."""
        await self._let_others_run(False)
        if self._inline(rows):
            return self._compute_inline(call, routing, rows)
        started = time.perf_counter()
        outputs = await self._compute_runs(call.layer, routing, rows)
        if outputs is None:
            return None
        self.local_calls += len(routing.experts)
        return ExpertsResult(combine(call, routing, outputs), None, None, time.perf_counter() - started, 0.0, routing)

    def _inline(self, rows: Tensor) -> bool:
        """Whether a block computes on this thread in one loop: small, and where every embedded host computes."""
        return rows.shape[0] <= self._inline_rows and rows.device == self._device

    def _compute_inline(self, call: MoECall, routing: Routing, rows: Tensor) -> ExpertsResult | None:
        """The whole block in one loop with the holders' weights, no await; each host counts its
        experts' part. None when an expert has no embedded holder."""
        holder, layer = self._holders(), call.layer
        started = time.perf_counter()
        try:
            weights = [self._weights[(layer, e)] for e in routing.experts]
        except KeyError:
            return None
        outputs = run_experts(weights, rows, routing.counts)
        took = time.perf_counter() - started
        if len(self.embedded) == 1:
            self.embedded[0].count_direct(len(weights), rows.shape[0], took)
        else:
            self._count_per_host(layer, routing, holder, took / rows.shape[0])
        self.local_calls += len(weights)
        return ExpertsResult(combine(call, routing, outputs), None, None, took, 0.0, routing)

    def _count_per_host(
        self, layer: int, routing: Routing, holder: dict[tuple[int, int], int], per_row_s: float
    ) -> None:
        """Each embedded host counts its experts' calls and rows of a block computed in one loop (and its
        share of the time, by rows)."""
        calls = [0] * len(self.embedded)
        rows = [0] * len(self.embedded)
        for expert, n in zip(routing.experts, routing.counts, strict=True):
            index = holder[(layer, expert)]
            calls[index] += 1
            rows[index] += n
        for host, c, n in zip(self.embedded, calls, rows, strict=True):
            if c:
                host.count_direct(c, n, per_row_s * n)

    async def _compute_runs(self, layer: int, routing: Routing, rows: Tensor) -> Tensor | None:
        """The block as each holder's runs, each on its host's device (a big block on its worker thread)."""
        runs = _runs(routing, layer, self._holders())
        if runs is None:
            return None
        hosts = self.embedded
        try:
            parts = [await hosts[i].compute_block(layer, experts, rows[a:b], n) for i, experts, n, a, b in runs]
        except PrismError:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    async def _let_others_run(self, remote: bool) -> None:
        """Yield to the event loop before local compute. With requests in flight, two turns (the first
        publishes them into the client's buffer, the second runs its flusher, which writes them to the
        socket). Without, one turn once `TURN_EVERY_S` has passed since the last: other nodes' batches,
        heartbeats and intake are served between layers even when every expert is embedded."""
        now = time.perf_counter()
        if not remote and now - self._turned < TURN_EVERY_S:
            return
        self._turned = now
        for _ in range(2 if remote else 1):
            await asyncio.sleep(0)

    def _split(self, layer: int, experts: list[int]) -> tuple[dict[int, list[int]], list[int]]:
        """(embedded host index → experts it computes here, experts to ask over the bus)."""
        holder = self._holders()
        local: dict[int, list[int]] = {}
        remote = []
        for expert in experts:  # plain loops: this runs on every MoE layer of every step
            index = holder.get((layer, expert))
            if index is None:
                remote.append(expert)
            else:
                local.setdefault(index, []).append(expert)
        return local, remote

    def _holders(self) -> dict[tuple[int, int], int]:
        """(layer, expert) → index of the first embedded host holding it; rebuilt only after a host
        loaded or freed an expert."""
        if self._holder is None:
            self._holder, self._weights = {}, {}
            for index in reversed(range(len(self.embedded))):  # the first holder wins
                self._holder.update(dict.fromkeys(self.embedded[index].weights, index))
                self._weights.update(self.embedded[index].weights)
        return self._holder

    def _forget_holders(self) -> None:
        self._holder = None

    async def _compute_local(
        self, layer: int, local: dict[int, list[int]], rows: Tensor, spans: Spans, deadline: float
    ) -> list[tuple[list[int], Answer]]:
        answers: list[tuple[list[int], Answer]] = []
        for index, experts in local.items():
            counts = [spans[e][1] - spans[e][0] for e in experts]
            try:
                out = await self.embedded[index].compute_block(layer, experts, _take(rows, experts, spans), counts)
            except PrismError:  # freed by a migration since the split: its new holder is on the bus
                answers += await self._answer(layer, rows, spans, experts, deadline)
                continue
            self.local_calls += len(experts)
            answers.append((experts, out))
        return answers

    @staticmethod
    def _combine(  # noqa: PLR0917 - one call's results
        call: MoECall,
        routing: Routing,
        rows: Tensor,
        answers: list[tuple[list[int], Answer]],
        local_s: float,
        remote_wait_s: float,
    ) -> ExpertsResult:
        spans = routing.spans
        first = answers[0] if len(answers) == 1 else None
        if first is not None and isinstance(first[1], Tensor) and len(first[0]) == len(spans):
            outputs = first[1].to(rows.dtype)  # one answer for the whole block (a host's), in block order
        else:
            outputs = torch.zeros_like(rows)
            for experts, answer in answers:
                if isinstance(answer, Tensor):
                    _place(outputs, answer.to(rows.dtype), experts, spans)
        failed: Tensor | None = None
        error: PrismError | None = None
        for experts, answer in answers:
            if isinstance(answer, PrismError):
                if failed is None:
                    failed = torch.zeros(call.hidden.shape[0], dtype=torch.bool)
                for expert in experts:
                    failed[routing.token_idx[slice(*spans[expert])]] = True
                error = error or answer
        return ExpertsResult(combine(call, routing, outputs), failed, error, local_s, remote_wait_s, routing)

    async def _answer(
        self, layer: int, rows: Tensor, spans: Spans, experts: list[int], deadline: float
    ) -> list[tuple[list[int], Answer]]:
        """`experts`' output rows (or error), as (experts, their rows stacked in that order): one
        message per known holding host, the rest (and what a host refuses) on the experts' own subjects."""
        self.remote_calls += len(experts)
        by_host, direct = self.directory.route(layer, experts) if self.directory else ({}, experts)
        self.node_calls += self.directory.calls_on_node(by_host) if self.directory else 0
        jobs = [self._via_host(host, layer, held, rows, spans, deadline) for host, held in by_host.items()]
        if direct:
            jobs.append(self._via_subjects(layer, direct, rows, spans, deadline))
        if len(jobs) == 1:  # the usual case on a node whose host holds the layer: no task to schedule
            return await jobs[0]
        return [answer for part in await asyncio.gather(*jobs) for answer in part]

    async def _via_host(  # noqa: PLR0917 - one call's context
        self, host: str, layer: int, experts: list[int], rows: Tensor, spans: Spans, deadline: float
    ) -> list[tuple[list[int], Answer]]:
        hidden = _take(rows, experts, spans)
        counts = [spans[e][1] - spans[e][0] for e in experts]
        payload = encode_tensor(hidden, {"layer": layer, "experts": experts, "counts": counts})
        self.messages += 1
        try:
            check_size(payload, None, self.max_payload)
            msg = await self.nc.request(subjects.host_calls(host), payload, timeout=_left(deadline))
        except (PrismError, NoRespondersError, NatsTimeoutError, TimeoutError):
            return await self._via_subjects(layer, experts, rows, spans, deadline)
        out = _parse_reply(msg.headers, msg.data, hidden, f"host {host}")
        if isinstance(out, PrismError):  # e.g. it no longer holds one of them: ask the experts' subjects
            return await self._via_subjects(layer, experts, rows, spans, deadline)
        return [(experts, out)]

    async def _via_subjects(
        self, layer: int, experts: list[int], rows: Tensor, spans: Spans, deadline: float
    ) -> list[tuple[list[int], Answer]]:
        """Each expert on its own subject, all at once, split into messages that fit max_payload."""
        per_message = max_rows_per_message(rows.shape[1] * rows.element_size(), self.max_payload)

        async def one(expert: int) -> tuple[list[int], Answer]:
            chunks = torch.split(rows[slice(*spans[expert])], per_message)
            self.messages += len(chunks)
            parts = await asyncio.gather(*(self._ask(layer, expert, chunk, deadline) for chunk in chunks))
            errors = [p for p in parts if isinstance(p, PrismError)]
            return [expert], errors[0] if errors else torch.cat([p for p in parts if isinstance(p, Tensor)])

        return list(await asyncio.gather(*(one(expert) for expert in experts)))

    async def _ask(self, layer: int, expert: int, hidden: Tensor, deadline: float) -> Tensor | PrismError:
        """One request; every failure becomes an ExpertUnavailable value (never raised).

        "No responders" is retried until the timeout: while an expert moves, its new holder's interest
        may still be crossing the leaf connections when the old holder has already let go.
        """
        payload = encode_tensor(hidden)
        name = f"expert {layer}.{expert}"
        loop = asyncio.get_running_loop()
        try:
            check_size(payload, None, self.max_payload)
            while True:
                try:
                    msg = await self.nc.request(subjects.expert(layer, expert), payload, timeout=_left(deadline))
                    break
                except NoRespondersError:
                    if loop.time() + NO_RESPONDERS_RETRY_S >= deadline:
                        return ExpertUnavailable(
                            f"{name}: no host holds it (no responders within the layer's {self.timeout_s:g} s)"
                        )
                    await asyncio.sleep(NO_RESPONDERS_RETRY_S)
        except (NatsTimeoutError, TimeoutError):
            return ExpertUnavailable(f"{name}: no answer within the layer's {self.timeout_s:g} s")
        except PrismError as err:
            return ExpertUnavailable(f"{name}: {err.message}")
        return _parse_reply(msg.headers, msg.data, hidden, name)


def _count(counter: ActivationCounter, call: MoECall, routing: Routing) -> None:
    tokens = sum(routing.counts) // call.expert_ids.shape[1]  # live ones: each chose K experts
    counter.add(call.layer, routing.experts, routing.counts, tokens=tokens)


def _runs(
    routing: Routing, layer: int, holder: dict[tuple[int, int], int]
) -> list[tuple[int, list[int], list[int], int, int]] | None:
    """The block as runs of consecutive experts that one embedded host holds, in block order: (host
    index, experts, their row counts, first row, end row); None when an expert has no embedded holder."""
    runs: list[tuple[int, list[int], list[int], int, int]] = []
    start = 0
    for expert, n in zip(routing.experts, routing.counts, strict=True):
        index = holder.get((layer, expert))
        if index is None:
            return None
        if runs and runs[-1][0] == index:
            index, experts, counts, first, _ = runs[-1]
            runs[-1] = (index, [*experts, expert], [*counts, n], first, start + n)
        else:
            runs.append((index, [expert], [n], start, start + n))
        start += n
    return runs


def _left(deadline: float) -> float:
    """Seconds to `deadline` on the loop's clock (at least 1 ms: a request needs a positive timeout)."""
    return max(deadline - asyncio.get_running_loop().time(), 1e-3)


def _take(rows: Tensor, experts: list[int], spans: Spans) -> Tensor:
    """The rows of `experts`, stacked in that order (no copy when they are the whole block)."""
    if len(experts) == len(spans):
        return rows
    return torch.cat([rows[slice(*spans[e])] for e in experts])


def _place(outputs: Tensor, answer: Tensor, experts: list[int], spans: Spans) -> None:
    """Write `answer` (the rows of `experts`, stacked in that order) back into the block."""
    if len(experts) == len(spans):
        outputs.copy_(answer)
        return
    offset = 0
    for expert in experts:
        start, end = spans[expert]
        outputs[start:end] = answer[offset : offset + end - start]
        offset += end - start


def _parse_reply(headers: dict[str, str] | None, data: bytes, hidden: Tensor, name: str) -> Tensor | PrismError:
    remote = error_from_headers(headers)
    if remote is not None:
        return ExpertUnavailable(f"{name}: host replied {remote.code}: {remote.message}")
    try:
        out, _ = decode_tensor(data)
    except PrismError as err:
        return ExpertUnavailable(f"{name}: bad reply: {err.message}")
    if out.shape != hidden.shape:
        return ExpertUnavailable(f"{name}: reply shape {list(out.shape)} != {list(hidden.shape)}")
    return out
