"""Lockstep: a node's streams of forward work (its own step, other nodes' segments) share a layer's dispatch.

A real gating (embedded host holding every expert, over NATS) and its `Lockstep`: calls of one layer
made by two computing streams in one event-loop turn leave as one dispatch, each stream gets its own
rows, equal to the experts in one process, and only the own step's tokens count at this node; a lone
stream, or streams at different layers, dispatch alone; a call waits for a stream one layer behind it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from services.gating.engine import ExpertsResult
from services.gating.lockstep import Lockstep
from shared.model.moe import LocalExperts, MoECall
from tests.serving.conftest import LocalCluster

LAYER = 1


def moe_call(layer: int, tokens: int, seed: int, hidden_size: int, experts: int) -> MoECall:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), dim=-1)
    return MoECall(layer, torch.randn(tokens, hidden_size, generator=g), ids, weights)


async def one_stream(lockstep: Lockstep, call: MoECall, *, counted: bool) -> ExpertsResult:
    with lockstep.stream():
        await asyncio.sleep(0)  # every stream of the test is computing before any calls
        return await (lockstep.counted if counted else lockstep.uncounted)(call, None)


async def node(cluster: LocalCluster, model: Path) -> tuple[Lockstep, LocalExperts, list[int], int]:
    """The gating's lockstep, the experts in one process, and the layer's activation row and size."""
    await cluster.add_node("a")
    gating = await cluster.add_gating("a", model, embedded={"ae": "*:*"}, activation_interval_s=3600)
    assert gating.lockstep is not None
    config = gating.engine.model.config
    return gating.lockstep, LocalExperts.from_checkpoint(model), gating.counter.counts[gating.counter.row[LAYER]], \
        config.hidden_size


async def test_two_streams_at_one_layer_share_one_dispatch(cluster: LocalCluster, mixtral_dir: Path) -> None:
    lockstep, local, row, hidden = await node(cluster, mixtral_dir)
    own, foreign = moe_call(LAYER, 3, 1, hidden, 8), moe_call(LAYER, 2, 2, hidden, 8)
    results = await asyncio.gather(
        one_stream(lockstep, own, counted=True), one_stream(lockstep, foreign, counted=False)
    )
    assert (lockstep.shared_dispatches, lockstep.shared_parts) == (1, 2)
    for result, call in zip(results, (own, foreign), strict=True):
        assert result.error is None
        torch.testing.assert_close(result.output, local(call), rtol=1e-5, atol=1e-6)
    chosen = torch.bincount(own.expert_ids.reshape(-1), minlength=8).tolist()
    assert row == chosen  # the own step's choices count here; the segment's count at its home


async def test_a_lone_stream_and_streams_at_other_layers_dispatch_alone(
    cluster: LocalCluster, mixtral_dir: Path
) -> None:
    lockstep, local, _, hidden = await node(cluster, mixtral_dir)
    alone = await one_stream(lockstep, moe_call(LAYER, 2, 3, hidden, 8), counted=True)
    apart = [moe_call(0, 2, 4, hidden, 8), moe_call(LAYER, 1, 5, hidden, 8)]
    results = await asyncio.gather(*(one_stream(lockstep, call, counted=False) for call in apart))
    assert lockstep.shared_dispatches == 0
    torch.testing.assert_close(alone.output, local(moe_call(LAYER, 2, 3, hidden, 8)), rtol=1e-5, atol=1e-6)
    for result, call in zip(results, apart, strict=True):
        torch.testing.assert_close(result.output, local(call), rtol=1e-5, atol=1e-6)


async def test_a_stream_one_layer_behind_is_waited_for_then_they_share(
    cluster: LocalCluster, mixtral_dir: Path
) -> None:
    """A call at layer 1 waits for a stream whose last call was layer 0; they share layer 1's dispatch. A
    stream that leaves instead does not keep it waiting."""
    lockstep, local, _, hidden = await node(cluster, mixtral_dir)
    calls = {name: moe_call(layer, 2, seed, hidden, 8) for name, layer, seed in
             (("b0", 0, 6), ("b1", 1, 7), ("a1", 1, 8))}

    async def behind(then: bool) -> list[ExpertsResult]:
        with lockstep.stream():
            await asyncio.sleep(0)  # both streams compute before either calls
            done = [await lockstep.uncounted(calls["b0"], None)]
            if then:
                done.append(await lockstep.uncounted(calls["b1"], None))
            return done

    async def ahead() -> ExpertsResult:
        with lockstep.stream():
            await asyncio.sleep(0)  # the other stream has called layer 0 by now (held: two streams compute)
            return await lockstep.uncounted(calls["a1"], None)

    (b0, b1), a1 = await asyncio.gather(behind(then=True), ahead())
    assert (lockstep.shared_dispatches, lockstep.shared_parts) == (1, 2)
    for result, name in ((b0, "b0"), (b1, "b1"), (a1, "a1")):
        torch.testing.assert_close(result.output, local(calls[name]), rtol=1e-5, atol=1e-6)
    async with asyncio.timeout(5):
        (b0,), a1 = await asyncio.gather(behind(then=False), ahead())
    assert lockstep.shared_dispatches == 1
    torch.testing.assert_close(a1.output, local(calls["a1"]), rtol=1e-5, atol=1e-6)
