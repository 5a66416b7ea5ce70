"""Expert weights in the JetStream object store `prism_weights`: one object per expert.

Object `<model>/<layer>/<expert>` holds safetensors bytes with tensors `gate [I, D]`, `up [I, D]` and
`down [D, I]`. A read checks the object's size and SHA-256 digest, then names and shapes, so a corrupt
or foreign object is an error, never a silently wrong expert.

Hosts read through `WeightsStore`, not nats-py's `ObjectStore.get`: that one reads an object's chunks
through a push consumer and joins them into one `bytes` chunk by chunk, 17 MB/s for a 17 MB expert on
the development machine (its copying grows with the square of the chunks), and leaves the consumer to
the server, which keeps it ~5 s. A pull consumer fetched in batches, deleted after the read, reads at
hundreds of MB/s (FACTS.md) and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import uuid

import torch
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ObjectMeta, ObjectMetaOptions
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.errors import Error as JetStreamError
from nats.js.object_store import ObjectStore
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shared.errors import PrismError
from shared.model.moe import ExpertWeights

CHUNK_BYTES = 128 * 1024  # nats-py's default object chunk


class WeightsError(PrismError):
    """An expert's weights are missing from the store or do not match the model."""

    code = "weights_unavailable"
    status = 503


def object_name(model: str, layer: int, expert: int) -> str:
    return f"{model}/{layer}/{expert}"


def expert_bytes(weights: ExpertWeights) -> bytes:
    tensors = {"gate": weights.gate, "up": weights.up, "down": weights.down}
    return save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def expert_from_bytes(data: bytes, hidden_size: int, name: str) -> ExpertWeights:
    """Parse and check one expert object: [I, D], [I, D], [D, I] with D = hidden_size."""
    try:
        tensors = load_safetensors(data)
        gate, up, down = tensors["gate"], tensors["up"], tensors["down"]
    except Exception as exc:  # safetensors raises its own error types for corrupt bytes
        raise WeightsError(f"object {name} is not an expert's safetensors: {exc}") from None
    inter = gate.shape[0]
    if gate.shape != (inter, hidden_size) or up.shape != gate.shape or down.shape != (hidden_size, inter):
        raise WeightsError(
            f"object {name} has shapes gate {list(gate.shape)}, up {list(up.shape)}, down {list(down.shape)}; "
            f"expected [I, {hidden_size}], [I, {hidden_size}], [{hidden_size}, I]"
        )
    return ExpertWeights(gate, up, down)


async def upload_expert(
    store: ObjectStore, model: str, key: tuple[int, int], weights: ExpertWeights, *, chunk_bytes: int = CHUNK_BYTES
) -> bool:
    """Put one expert unless an object of the same name and bytes exists (same SHA-256: a retrained model
    has experts of the same size); True when uploaded. Each chunk is one message: `chunk_bytes` must fit
    the server's max_payload (see `chunk_bytes_for`)."""
    name = object_name(model, *key)
    data = expert_bytes(weights)
    try:
        info = await store.get_info(name)
        if info.digest == _digest(data):
            return False
    except (ObjectNotFoundError, NotFoundError):
        pass
    await store.put(name, data, meta=ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=chunk_bytes)))
    return True


READERS = 100_000
"""Consumers the weights' stream allows at once. Every object read is one while it lasts, and nats-server
2.15 allows a stream 1000 unless it says otherwise. With nats-py's `get`, whose consumers the server
kept ~5 s after each read, four hosts loading small experts four at a time reached that within a second
and the migration failed with `maximum consumers limit reached`; `WeightsStore` deletes its consumers,
and the limit is kept far off for the reads of many hosts at once and for a consumer whose delete was
lost."""


async def open_weights_store(js: JetStreamContext, bucket: str) -> ObjectStore:
    """The weights' object store (created if absent), its stream allowing `READERS` consumers."""
    try:  # an existing one first: once its stream's limit is raised, creating it again would be refused
        store = await js.object_store(bucket)
    except (BucketNotFoundError, NotFoundError):
        store = await js.create_object_store(bucket=bucket)
    stream = f"OBJ_{bucket}"  # the object store's stream (its naming is part of the JetStream spec)
    config = (await js.stream_info(stream)).config
    if config.max_consumers != READERS:
        await js.update_stream(dataclasses.replace(config, max_consumers=READERS))
    return store


def chunk_bytes_for(max_payload: int) -> int:
    """Object store chunk size for a server whose messages carry at most `max_payload` bytes (room
    left for the chunk's headers); nats-py's default of 128 KiB where that fits."""
    return max(1024, min(CHUNK_BYTES, max_payload - 4096))


_DELETES: set[asyncio.Future[None]] = set()  # consumer deletes under way (a task needs a reference)
READ_BATCH = 64  # chunks per fetch of a read (8 MiB at the default chunk size)
READ_WAIT_S = 10.0  # longest a fetch waits for chunks that the stream holds already


@dataclasses.dataclass(frozen=True)
class WeightsStore:
    """The weights' object store as hosts read it: its JetStream context (the host's domain) and bucket."""

    js: JetStreamContext
    bucket: str
    objects: ObjectStore

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str) -> WeightsStore:
        return cls(js, bucket, await js.object_store(bucket))

    async def read(self, name: str) -> bytes:
        """The object's bytes, its size and digest checked; WeightsError when it cannot be had."""
        try:
            info = await self.objects.get_info(name)
            data = await self._chunks(info.nuid or "", info.size or 0)
        except (ObjectNotFoundError, NotFoundError):
            raise WeightsError(f"object {name} is not in the weights store") from None
        except (JetStreamError, NatsTimeoutError) as exc:  # the store answered, but not with the object
            raise WeightsError(f"object {name} could not be read from the weights store: {exc!r}") from None
        if len(data) != info.size or _digest(data) != info.digest:
            raise WeightsError(f"object {name} is corrupt: {len(data)} bytes or their digest do not match its info")
        return data

    async def _chunks(self, nuid: str, size: int) -> bytes:
        """The chunks of object `nuid` through a pull consumer of its own, deleted after the read."""
        stream, subject = f"OBJ_{self.bucket}", f"$O.{self.bucket}.C.{nuid}"  # the object store's layout
        name = f"read-{uuid.uuid4().hex}"  # named by us (nats-py would name an ephemeral one): deleted by name
        config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
                                filter_subject=subject, inactive_threshold=60.0)  # should the delete be lost
        await self.js.add_consumer(stream, config)
        data = bytearray()
        try:
            sub = await self.js.pull_subscribe_bind(durable=name, stream=stream)
            while len(data) < size:
                for msg in await sub.fetch(READ_BATCH, timeout=READ_WAIT_S):
                    data += msg.data
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        finally:  # in the background: the read is done, and a lost delete leaves it to inactive_threshold
            task = asyncio.ensure_future(self._delete(stream, name))
            _DELETES.add(task)
            task.add_done_callback(_DELETES.discard)
        return bytes(data)

    async def _delete(self, stream: str, consumer: str) -> None:
        with contextlib.suppress(Exception):
            await self.js.delete_consumer(stream, consumer)


async def fetch_expert(
    store: WeightsStore, model: str, key: tuple[int, int], *, hidden_size: int, dtype: torch.dtype, device: str
) -> ExpertWeights:
    name = object_name(model, *key)
    return expert_from_bytes(await store.read(name), hidden_size, name).to(dtype=dtype, device=device)


def _digest(data: bytes) -> str:
    """The digest nats-py's object store records for `data` (ObjectInfo.digest)."""
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
