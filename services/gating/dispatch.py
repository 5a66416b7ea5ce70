"""Send one MoE call's token groups to the expert subjects, all at once, and combine the answers.

Each (layer, expert) group goes to `prism.v1.expert.<layer>.<expert>` as a request (split into
several when it would exceed max_payload); NATS picks the nearest holder in the queue group. A group
that gets no answer within `timeout_s`, "no responders", or an error reply marks its tokens failed
with `expert_unavailable`; the caller decides which requests that fails.
"""

from __future__ import annotations

import asyncio
import time

import torch
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from torch import Tensor

from services.gating.engine import ExpertsResult
from shared import subjects
from shared.activations import ActivationCounter
from shared.codec import check_size, decode_tensor, encode_tensor, max_rows_per_message
from shared.errors import ExpertUnavailable, PrismError, error_from_headers
from shared.model.moe import MoECall, combine, group_by_expert

NO_RESPONDERS_RETRY_S = 0.02


class RemoteExperts:
    """The gating's `ExpertsFn`: routed experts over NATS."""

    def __init__(
        self, nc: NatsClient, *, timeout_s: float, max_payload: int, counter: ActivationCounter | None = None
    ) -> None:
        self.nc = nc
        self.timeout_s = timeout_s
        self.max_payload = max_payload
        self.counter = counter
        self.messages = 0
        self.wait_s = 0.0

    async def __call__(self, call: MoECall, live: Tensor) -> ExpertsResult:
        T, D = call.hidden.shape
        if self.counter is not None:
            self.counter.add(call.layer, call.expert_ids[live].cpu().numpy())
        rows = max_rows_per_message(D * call.hidden.element_size(), self.max_payload)
        groups = group_by_expert(call.expert_ids)
        everyone = bool(live.all())
        jobs, slices = [], []
        for expert, token_idx, _ in groups:
            positions = torch.arange(token_idx.numel()) if everyone else torch.nonzero(live[token_idx]).flatten()
            for chunk in torch.split(positions, rows):
                jobs.append(self._ask(call.layer, expert, call.hidden[token_idx[chunk]]))
                slices.append((expert, token_idx, chunk))
        started = time.perf_counter()
        answers = await asyncio.gather(*jobs)
        self.wait_s += time.perf_counter() - started
        self.messages += len(jobs)
        # rows of dead tokens stay zero: they are never read, but combine needs every group's shape
        outputs = {expert: torch.zeros(idx.numel(), D, dtype=call.hidden.dtype) for expert, idx, _ in groups}
        failed = torch.zeros(T, dtype=torch.bool)
        error: PrismError | None = None
        for (expert, token_idx, chunk), answer in zip(slices, answers, strict=True):
            if isinstance(answer, PrismError):
                failed[token_idx[chunk]] = True
                error = error or answer
            elif chunk.numel() == token_idx.numel():
                outputs[expert] = answer.to(call.hidden.dtype)
            else:
                outputs[expert][chunk] = answer.to(call.hidden.dtype)
        return ExpertsResult(combine(call, outputs, groups=groups), failed, error)

    async def _ask(self, layer: int, expert: int, hidden: Tensor) -> Tensor | PrismError:
        """One request; every failure becomes an ExpertUnavailable value (never raised).

        "No responders" is retried until the timeout: while an expert moves, its new holder's interest
        may still be crossing the leaf connections when the old holder has already let go.
        """
        payload = encode_tensor(hidden)
        name = f"expert {layer}.{expert}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            check_size(payload, None, self.max_payload)
            while True:
                try:
                    msg = await self.nc.request(
                        subjects.expert(layer, expert), payload, timeout=max(deadline - loop.time(), 1e-3)
                    )
                    break
                except NoRespondersError:
                    if loop.time() + NO_RESPONDERS_RETRY_S >= deadline:
                        return ExpertUnavailable(f"{name}: no host holds it (no responders for {self.timeout_s:g} s)")
                    await asyncio.sleep(NO_RESPONDERS_RETRY_S)
        except (NatsTimeoutError, TimeoutError):
            return ExpertUnavailable(f"{name}: no answer within {self.timeout_s:g} s")
        except PrismError as err:
            return ExpertUnavailable(f"{name}: {err.message}")
        return _parse_reply(msg.headers, msg.data, hidden, name)


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
