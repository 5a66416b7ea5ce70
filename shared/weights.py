"""Expert weights in the JetStream object store `prism_weights`: one object per expert.

Object `<model>/<layer>/<expert>` holds safetensors bytes with tensors `gate [I, D]`, `up [I, D]` and
`down [D, I]`. nats-py checks each object's SHA-256 digest on read; we also check names and shapes,
so a corrupt or foreign object is an error, never a silently wrong expert.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib

import torch
from nats.js.api import ObjectMeta, ObjectMetaOptions
from nats.js.client import JetStreamContext
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError, ObjectNotFoundError
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
"""Consumers the weights' stream allows at once. Every object read is one (nats-py's `get` reads through an
ordered consumer, which the server keeps about 5 s after the read), and nats-server 2.15 allows a stream
1000 unless it says otherwise: four hosts loading small experts four at a time reached that within a
second, and the migration failed with `maximum consumers limit reached`."""


async def open_weights_store(js: JetStreamContext, bucket: str) -> ObjectStore:
    """The weights' object store (created if absent), its stream allowing `READERS` consumers."""
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


async def fetch_expert(
    store: ObjectStore, model: str, key: tuple[int, int], *, hidden_size: int, dtype: torch.dtype, device: str
) -> ExpertWeights:
    name = object_name(model, *key)
    try:
        result = await store.get(name)
    except (ObjectNotFoundError, NotFoundError):
        raise WeightsError(f"object {name} is not in the weights store") from None
    except JetStreamError as exc:  # the store answered, but not with the object
        raise WeightsError(f"object {name} could not be read from the weights store: {exc}") from None
    if result.data is None:
        raise WeightsError(f"object {name} is empty")
    return expert_from_bytes(result.data, hidden_size, name).to(dtype=dtype, device=device)


def _digest(data: bytes) -> str:
    """The digest nats-py's object store records for `data` (ObjectInfo.digest)."""
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
