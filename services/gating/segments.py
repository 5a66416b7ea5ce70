"""Other nodes' route segments, executed here: their KV for the layers this node runs, its experts.

A segment message (`prism.v1.route.<node>.segment`) is a tensor envelope of the step's hidden states
x [T, D] with meta `home`, `seqs` (ids, one per sequence of the step), `counts` (new tokens per
sequence, summing to T), `lens` (tokens each had cached before the step) and `chain` (the segments
still to run, `[[start, end, node], ...]`, this node's first). The runner keeps a KV slot per foreign
sequence and segment (a route may visit a node twice) in a cache of its own (`max_slots` of them): a
sequence's segment is admitted when its first step arrives (`lens` 0) and freed when its home releases
it (`prism.v1.route.<node>.release`) or after `idle_ttl_s` without a step (its home stopped answering).
A message that does not fit (shapes, an unknown sequence, a KV length that disagrees with `lens`, a
segment for another node) is refused with `bad_segment`; no cache length moves unless the whole segment
ran. Segments of one layer range that wait together (from any homes) run as one batch (`run_many`),
each failing alone where it can: an expert that did not answer fails the segments whose rows chose it,
and the others go on without those rows. The experts a segment's tokens chose travel on with the hidden
states (meta `activations`) so that the home counts them, as if it had run the layers itself
(placement's statistics are per home node).

Shape legend: T tokens, D hidden size, B sequences.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from services.gating.engine import Alone, ExpertsFn, ExpertsResult, Streams, failed_items, live_rows, resume
from services.gating.routes import Segment
from shared import subjects
from shared.errors import BadSegment, Overloaded, PrismError
from shared.model.errors import InputError
from shared.model.inference import executor
from shared.model.model import MoEModel
from shared.model.moe import MoECall, Routing

Activation = list[Any]
"""[layer, experts, counts, tokens] of one MoE layer a segment ran: what `ActivationCounter.add` takes."""
SegmentResult = tuple[Tensor, list[Activation]]
"""x [T, D] after a segment, and the experts its tokens chose in each MoE layer."""


@dataclass(frozen=True)
class SegmentRequest:
    """One decoded segment message."""

    home: str
    seqs: list[str]
    counts: list[int]
    lens: list[int]
    chain: list[Segment]

    @classmethod
    def parse(cls, meta: dict[str, Any], hidden: Tensor, node: str, hidden_size: int) -> SegmentRequest:
        """Check `meta` and x [T, D] against each other and against this node; BadSegment otherwise."""
        try:
            req = cls(
                home=subjects.check_token(str(meta["home"]), "home"),
                seqs=[str(s) for s in meta["seqs"]],
                counts=[int(n) for n in meta["counts"]],
                lens=[int(n) for n in meta["lens"]],
                chain=[Segment(int(a), int(b), subjects.check_token(str(n), "node")) for a, b, n in meta["chain"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            want = "home, seqs, counts, lens and chain [[start, end, node]]"
            raise BadSegment(f"segment meta needs {want}: {exc}") from None
        if not req.seqs or not len(req.seqs) == len(req.counts) == len(req.lens) or len(set(req.seqs)) < len(req.seqs):
            raise BadSegment(f"{len(req.seqs)} distinct sequences need as many counts and lens")
        if min(req.counts) < 1 or min(req.lens) < 0:
            raise BadSegment("counts must be >= 1 and lens >= 0")
        if hidden.dim() != 2 or hidden.shape != (sum(req.counts), hidden_size):
            raise BadSegment(f"hidden states must be [{sum(req.counts)}, {hidden_size}], got {list(hidden.shape)}")
        if not req.chain or req.chain[0].node != node:
            raise BadSegment(f"this is node {node}; the segment's chain starts at {req.chain[:1]}")
        return req


class SegmentRunner:
    """Runs route segments for other nodes' requests with this node's dense layers and experts."""

    def __init__(
        self,
        node: str,
        model: MoEModel,
        experts: ExpertsFn,
        *,
        max_slots: int,
        max_len: int,
        idle_ttl_s: float,
        inline_max_tokens: int,
        streams: Streams | None = None,
    ) -> None:
        self.node = node
        self.streams = streams or Alone()  # shares each layer's expert dispatch with the node's own step
        self.model = model
        self.experts = experts
        self.cache = model.new_cache(max_slots, max_len)
        self.idle_ttl_s = idle_ttl_s
        self.inline_max_tokens = inline_max_tokens
        self.slots: dict[tuple[str, int], int] = {}  # (foreign sequence id, segment start) -> its KV slot here
        self.last_used: dict[tuple[str, int], float] = {}
        self._running: set[tuple[str, int]] = set()  # in a segment now: freed when it ends, if released meanwhile
        self._doomed: set[tuple[str, int]] = set()
        self.segments_run = 0
        self.forwards = 0  # forward passes: fewer than segments_run when several ran together
        self.busy_s = 0.0  # seconds in those forward passes
        self._executor = executor("segments")

    async def run(self, hidden: Tensor, req: SegmentRequest) -> tuple[Tensor, list[Activation]]:
        """x [T, D] after this node's first segment of `req.chain`, and the experts its tokens chose in
        each MoE layer (for the home's activation counts); its KV lengths advance only when every layer
        ran. Raises BadSegment, Overloaded, or the experts' error (ExpertUnavailable)."""
        (result,) = await self.run_many([(hidden, req)])
        if isinstance(result, PrismError):
            raise result
        return result

    async def run_many(self, items: list[tuple[Tensor, SegmentRequest]]) -> list[SegmentResult | PrismError]:
        """Segments of one layer range, from any homes, in one forward pass (continuous batching of the
        node's foreign work): each item's result, or the error that fails it alone (its KV does not fit,
        its lengths disagree, an expert its rows chose did not answer)."""
        seg = items[0][1].chain[0]
        if not 0 <= seg.start < seg.end <= self.model.config.num_layers:
            return [BadSegment(f"layers {seg.start}..{seg.end} are not layers of this model")] * len(items)
        results: list[SegmentResult | PrismError | None] = [None] * len(items)
        admitted: list[tuple[int, list[int]]] = []
        for i, (_, req) in enumerate(items):
            try:
                admitted.append((i, self._slots(req, seg.start)))
            except PrismError as err:
                results[i] = err
        if admitted:
            for i, out in zip([i for i, _ in admitted], await self._forward(items, admitted, seg), strict=True):
                results[i] = out
        return [r if r is not None else PrismError("segment not run") for r in results]

    async def _forward(
        self, items: list[tuple[Tensor, SegmentRequest]], admitted: list[tuple[int, list[int]]], seg: Segment
    ) -> list[SegmentResult | PrismError]:
        """The admitted items' layers as one step; rows are the items' in turn."""
        slots = [slot for _, item_slots in admitted for slot in item_slots]
        counts = [n for i, _ in admitted for n in items[i][1].counts]
        rows = [items[i][0].shape[0] for i, _ in admitted]
        try:
            step = self.model.segment_step(slots, counts, self.cache)
        except InputError as exc:
            return [BadSegment(str(exc))] * len(admitted)
        keys = [(sid, seg.start) for i, _ in admitted for sid in items[i][1].seqs]
        hidden = torch.cat([items[i][0] for i, _ in admitted]).to(self.model.dtype)
        self._running.update(keys)
        started = time.perf_counter()
        try:
            layers = self.model.layer_steps(step, hidden, seg.start, seg.end)
            inline = hidden.shape[0] <= self.inline_max_tokens
            with self.streams.stream():
                x, activations, failed = await self._drive(layers, rows, inline)
            for (i, item_slots), error in zip(admitted, failed, strict=True):
                if error is None:  # a failed segment's KV stays as it was: its home fails the request
                    for slot, n in zip(item_slots, items[i][1].counts, strict=True):
                        self.cache.advance(slot, n)
        except PrismError as err:
            return [err] * len(admitted)
        finally:
            self.busy_s += time.perf_counter() - started
            self._running.difference_update(keys)
            self._free([key for key in keys if key in self._doomed])
        self.segments_run += len(admitted)
        self.forwards += 1
        return [(part, acts) if error is None else error
                for part, acts, error in zip(torch.split(x, rows), activations, failed, strict=True)]

    def _slots(self, req: SegmentRequest, start: int) -> list[int]:
        """The KV slot of each sequence for the segment at `start`: a first step (lens 0) takes a free one."""
        now = time.monotonic()
        self.expire(now)
        keys = [(sid, start) for sid in req.seqs]
        for key, before in zip(keys, req.lens, strict=True):
            if key in self.slots and before == 0:  # its home restarted the sequence: start over
                self.cache.reset(self.slots[key])
            elif key not in self.slots and before == 0:
                if self.cache.num_free() == 0:
                    raise Overloaded(f"node {self.node} holds KV for {len(self.slots)} foreign segments; retry later")
                self.slots[key] = self.cache.allocate()
            elif key not in self.slots:
                raise BadSegment(f"node {self.node} holds no KV for request {key[0]} (first seen after its first step)")
            if (cached := self.cache.length(self.slots[key])) != before:
                raise BadSegment(f"request {key[0]}: {cached} tokens cached here, {before} at home")
            self.last_used[key] = now
        return [self.slots[key] for key in keys]

    async def _drive(
        self, layers: Generator[MoECall, Tensor, Tensor], rows: list[int], inline: bool
    ) -> tuple[Tensor, list[list[Activation]], list[PrismError | None]]:
        """Run the layers, answering each MoE call with this node's experts. Also, per item (`rows` each,
        in turn): the experts its rows chose in each MoE layer, and the error that failed it (an expert
        its rows chose did not answer; later layers leave its rows out), or None."""
        value: Tensor | None = None
        activations: list[list[Activation]] = [[] for _ in rows]
        failed: list[PrismError | None] = [None] * len(rows)
        live: Tensor | None = None  # [T] rows of items still going, once one has failed; None: all
        while True:
            call, x = await self._resume(layers, value, inline)
            if call is None:
                assert x is not None
                return x, activations, failed
            result = await self.experts(call, live)
            if result.error is not None:
                live = self._fail(result, rows, failed)
                if live is None:  # nothing left to compute
                    layers.close()
                    return call.hidden, activations, failed
            value = result.output
            if len(rows) == 1 and result.routing is not None:  # one item: its choices are the call's
                activations[0].append([call.layer, result.routing.experts, result.routing.counts, rows[0]])
                continue
            start = 0
            for item, n in enumerate(rows):
                routing = Routing.of(call.expert_ids[start : start + n])
                activations[item].append([call.layer, routing.experts, routing.counts, n])
                start += n

    @staticmethod
    def _fail(result: ExpertsResult, rows: list[int], failed: list[PrismError | None]) -> Tensor | None:
        """Mark the items whose rows failed in `result`; the rows still live, or None when none is."""
        assert result.error is not None
        for item, bad in enumerate(failed_items(result.failed, rows)):
            if bad and failed[item] is None:
                failed[item] = result.error
        going = [err is None for err in failed]
        return live_rows(going, rows) if any(going) else None

    async def _resume(
        self, layers: Generator[MoECall, Tensor, Tensor], value: Tensor | None, inline: bool
    ) -> tuple[MoECall | None, Tensor | None]:
        if inline:
            return resume(layers, value)
        return await asyncio.get_running_loop().run_in_executor(self._executor, resume, layers, value)

    def release(self, seqs: list[str]) -> int:
        """Free the KV of these sequences (their home finished them); returns how many slots were held."""
        done = set(seqs)
        return self._free([key for key in self.slots if key[0] in done])

    def expire(self, now: float) -> None:
        """Free segments idle for `idle_ttl_s` (their home stopped answering, or lost the release)."""
        self._free([key for key, used in self.last_used.items() if now - used > self.idle_ttl_s])

    def _free(self, keys: list[tuple[str, int]]) -> int:
        for key in keys:
            if key in self._running:  # its segment still computes with the slot: free it after
                self._doomed.add(key)
                continue
            self._doomed.discard(key)
            self.cache.free(self.slots.pop(key))
            self.last_used.pop(key, None)
        return len(keys)

    def close(self) -> None:
        self._executor.shutdown(wait=False)

