"""The continuous-batching engine without a broker: experts are an in-process async callable."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from services.gating.engine import DoneEvent, Engine, ErrorEvent, ExpertsResult, Sequence, TokenEvent
from shared.errors import ExpertUnavailable, Overloaded
from shared.model.model import MoEModel
from shared.model.moe import LocalExperts, MoECall
from shared.model.sampling import SamplingParams
from tests.serving.conftest import reference


class AsyncLocal:
    """In-process experts behind the engine's async interface; records the tokens of every call."""

    def __init__(self, experts: LocalExperts, fail_expert: tuple[int, int] | None = None) -> None:
        self.experts = experts
        self.fail_expert = fail_expert
        self.calls: list[int] = []

    async def __call__(self, call: MoECall, live: torch.Tensor | None) -> ExpertsResult:
        self.calls.append(call.hidden.shape[0])
        failed = torch.zeros(call.hidden.shape[0], dtype=torch.bool)
        if self.fail_expert and call.layer == self.fail_expert[0]:
            failed = (call.expert_ids == self.fail_expert[1]).any(dim=1)
            if live is not None:
                failed &= live
        error = ExpertUnavailable("expert gone") if failed.any() else None
        return ExpertsResult(self.experts(call), failed, error)


async def drain(seq: Sequence) -> list[object]:
    events: list[object] = []
    async with asyncio.timeout(30):
        while not events or isinstance(events[-1], TokenEvent):
            events.append(await seq.events.get())
    return events


def engine_for(model_dir: Path, experts: AsyncLocal, **kw: int) -> Engine:
    model = MoEModel.from_checkpoint(model_dir)
    return Engine(model, experts, max_slots=kw.get("max_slots", 8), max_len=64, max_queue=kw.get("max_queue", 16))


async def test_late_requests_join_running_batch(mixtral_dir: Path) -> None:
    experts = AsyncLocal(LocalExperts.from_checkpoint(mixtral_dir))
    engine = engine_for(mixtral_dir, experts)
    first = Sequence([5, 6, 7, 8], 12, SamplingParams())
    engine.submit(first)
    runner = asyncio.create_task(engine.run())
    try:
        await first.events.get()  # first token out: `first` is decoding
        second = Sequence([9, 10, 11], 4, SamplingParams())
        engine.submit(second)
        events_first, events_second = await asyncio.gather(drain(first), drain(second))
    finally:
        runner.cancel()
    # one step carried first's decode token and second's 3 prompt tokens together
    assert 4 in experts.calls
    assert isinstance(events_first[-1], DoneEvent)
    assert [e.token_id for e in events_second if isinstance(e, TokenEvent)] == reference(mixtral_dir, [[9, 10, 11]], 4)[
        0
    ]


async def test_full_queue_is_overloaded(mixtral_dir: Path) -> None:
    engine = engine_for(mixtral_dir, AsyncLocal(LocalExperts.from_checkpoint(mixtral_dir)), max_queue=2)
    engine.submit(Sequence([1], 1, SamplingParams()))
    engine.submit(Sequence([1], 1, SamplingParams()))
    with pytest.raises(Overloaded, match="already waiting"):
        engine.submit(Sequence([1], 1, SamplingParams()))


async def test_failed_expert_fails_only_its_sequences(mixtral_dir: Path) -> None:
    experts = AsyncLocal(LocalExperts.from_checkpoint(mixtral_dir), fail_expert=(1, 3))
    engine = engine_for(mixtral_dir, experts)
    seqs = [Sequence([t, t + 1], 3, SamplingParams()) for t in range(20, 60, 4)]
    for seq in seqs:
        engine.submit(seq)
    runner = asyncio.create_task(engine.run())
    try:
        results = await asyncio.gather(*(drain(s) for s in seqs))
    finally:
        runner.cancel()
    failed = [r for r in results if isinstance(r[-1], ErrorEvent)]
    done = [r for r in results if isinstance(r[-1], DoneEvent)]
    assert failed, "expert 1.3 should be needed by some of these prompts"
    assert done, "and not by others"
    assert all(isinstance(r[-1].error, ExpertUnavailable) for r in failed)
    assert engine.cache.num_free() == 8, "every slot is returned"


async def test_a_sampling_failure_fails_only_its_sequence(mixtral_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    experts = AsyncLocal(LocalExperts.from_checkpoint(mixtral_dir))
    engine = engine_for(mixtral_dir, experts)
    real_sample = engine.sampler.sample

    def sample(logits: torch.Tensor, params: SamplingParams, key: object = 0) -> int:
        if params.temperature == 0.5:  # injected fault: this sequence's sampling breaks
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_sample(logits, params, key)

    monkeypatch.setattr(engine.sampler, "sample", sample)
    broken = Sequence([5, 6, 7], 4, SamplingParams(temperature=0.5, seed=1))
    fine = Sequence([9, 10, 11], 4, SamplingParams())
    for seq in (broken, fine):
        engine.submit(seq)
    runner = asyncio.create_task(engine.run())
    try:
        events_broken, events_fine = await asyncio.gather(drain(broken), drain(fine))
    finally:
        runner.cancel()
    assert isinstance(events_broken[-1], ErrorEvent)
    assert events_broken[-1].error.message == "internal error while sampling"  # no internals leak out
    assert [e.token_id for e in events_fine if isinstance(e, TokenEvent)] == reference(mixtral_dir, [[9, 10, 11]], 4)[0]
    assert engine.cache.num_free() == 8


async def test_the_engine_counts_its_steps_for_the_activation_reports(mixtral_dir: Path) -> None:
    """Steps, the sequences in them, the dense compute over the MoE layers and the requests finished:
    what the placement service turns into batch sizes, step rates, the dense time of a layer and the
    steps a request takes."""
    experts = AsyncLocal(LocalExperts.from_checkpoint(mixtral_dir))
    engine = engine_for(mixtral_dir, experts)
    seqs = [Sequence([5, 6, 7], 6, SamplingParams(), stream=False) for _ in range(3)]
    for seq in seqs:
        engine.submit(seq)
    runner = asyncio.create_task(engine.run())
    try:
        await asyncio.gather(*(drain(seq) for seq in seqs))
    finally:
        runner.cancel()
    load = engine.load.take()
    assert load.steps == engine.steps == 6, "three sequences admitted together: one step per token"
    assert load.sequences == 18
    assert load.dense_layers == 6 * len(engine.model.config.moe_layers) == len(experts.calls)
    assert load.dense_s > 0
    assert load.finished == 3, "each request counted once when it finishes"
    assert engine.load.take().steps == 0
