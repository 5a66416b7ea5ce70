"""Expert weights through a real JetStream object store, on a server with a small max_payload."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
import torch

from shared.model.moe import ExpertWeights
from shared.nats_server import NatsServer, ServerConfig, free_port
from shared.weights import (
    WeightsError,
    WeightsStore,
    chunk_bytes_for,
    fetch_expert,
    object_name,
    open_weights_store,
    upload_expert,
)


async def test_experts_travel_in_chunks_that_fit_the_server(tmp_path: Path) -> None:
    """The services accept max_payload down to 64 KiB; nats-py's default 128 KiB chunks would not fit."""
    cfg = ServerConfig(name="small", port=free_port(), store_dir=tmp_path / "js", max_payload=64 * 1024)
    gate, up, down = torch.randn(96, 192), torch.randn(96, 192), torch.randn(192, 96)  # 221 KB in fp32
    async with NatsServer(cfg, tmp_path):
        nc = await nats.connect(cfg.client_url())
        try:
            store = await nc.jetstream().create_object_store("weights")
            expert = ExpertWeights(gate, up, down)
            with pytest.raises(nats.errors.MaxPayloadError):
                await upload_expert(store, "m", (0, 1), expert)
            assert await upload_expert(store, "m", (0, 1), expert, chunk_bytes=chunk_bytes_for(nc.max_payload))
            reader = await WeightsStore.open(nc.jetstream(), "weights")  # 3 chunks of 64 KiB at most
            back = await fetch_expert(reader, "m", (0, 1), hidden_size=192, dtype=torch.float32, device="cpu")
        finally:
            await nc.close()
    assert torch.equal(back.gate_up, expert.gate_up)
    assert torch.equal(back.down, expert.down)
    assert chunk_bytes_for(8 << 20) == 128 * 1024


async def test_a_retrained_expert_of_the_same_size_replaces_the_stored_one(nats_hub: NatsServer, unique: str) -> None:
    """The store used to be skipped when an object of the same size existed: after retraining (same
    shapes), hosts kept loading the old weights from a store that persists."""
    nc = await nats.connect(nats_hub.cfg.client_url())
    try:
        store = await nc.jetstream(domain="hub").create_object_store(f"{unique}-weights")
        old = ExpertWeights(torch.zeros(8, 16), torch.zeros(8, 16), torch.zeros(16, 8))
        new = ExpertWeights(torch.ones(8, 16), torch.ones(8, 16), torch.ones(16, 8))
        assert await upload_expert(store, "m", (0, 1), old)
        assert not await upload_expert(store, "m", (0, 1), old)  # the same bytes: nothing to do
        assert await upload_expert(store, "m", (0, 1), new)
        reader = await WeightsStore.open(nc.jetstream(domain="hub"), f"{unique}-weights")
        back = await fetch_expert(reader, "m", (0, 1), hidden_size=16, dtype=torch.float32, device="cpu")
    finally:
        await nc.close()
    assert torch.equal(back.down, new.down)


async def test_more_reads_than_a_streams_default_consumers_at_once(nats_hub: NatsServer, unique: str) -> None:
    """Each read is a consumer, and nats-server 2.15 allows a stream 1000 by default: with nats-py's `get`,
    whose consumers the server kept ~5 s, hosts loading small experts at once failed the migration."""
    nc = await nats.connect(nats_hub.cfg.client_url())
    try:
        store = await open_weights_store(nc.jetstream(domain="hub"), f"{unique}-weights")
        await upload_expert(store, "m", (0, 1), ExpertWeights(torch.ones(8, 16), torch.ones(8, 16), torch.ones(16, 8)))
        store = await open_weights_store(nc.jetstream(domain="hub"), f"{unique}-weights")  # as a restarted migrator
        reader = await WeightsStore.open(nc.jetstream(domain="hub"), f"{unique}-weights")
        at_once = asyncio.Semaphore(16)

        async def read() -> ExpertWeights:
            async with at_once:
                return await fetch_expert(reader, "m", (0, 1), hidden_size=16, dtype=torch.float32, device="cpu")

        experts = await asyncio.gather(*(read() for _ in range(1100)))
        for _ in range(50):  # each read deletes its consumer as it returns (in the background)
            left = (await nc.jetstream(domain="hub").stream_info(f"OBJ_{unique}-weights")).state.consumer_count
            if left == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    assert all(torch.equal(e.down, torch.ones(16, 8)) for e in experts)
    assert left == 0, "each read deletes its consumer (where the server would keep one ~5 s)"


async def test_an_object_whose_chunks_do_not_match_its_info_is_refused(nats_hub: NatsServer, unique: str) -> None:
    """A chunk too many (or a changed one) on the object's chunk subject: the read's size and digest
    check refuses it with `weights_unavailable`, never a wrong expert."""
    nc = await nats.connect(nats_hub.cfg.client_url())
    try:
        js = nc.jetstream(domain="hub")
        store = await open_weights_store(js, f"{unique}-weights")
        await upload_expert(store, "m", (0, 1), ExpertWeights(torch.ones(8, 16), torch.ones(8, 16), torch.ones(16, 8)))
        info = await store.get_info(object_name("m", 0, 1))
        await js.publish(f"$O.{unique}-weights.C.{info.nuid}", b"\x00" * 64)
        reader = await WeightsStore.open(js, f"{unique}-weights")
        with pytest.raises(WeightsError, match="corrupt") as refused:
            await fetch_expert(reader, "m", (0, 1), hidden_size=16, dtype=torch.float32, device="cpu")
    finally:
        await nc.close()
    assert refused.value.code == "weights_unavailable"
