"""Tensor wire format for the data plane: a msgpack map with dtype, shape and raw little-endian bytes.

    {"v": 1, "dtype": "bfloat16", "shape": [T, D], "data": <bytes>, "meta": {...}}

Never pickle or torch.save on the wire. bf16 travels as its raw 16-bit patterns, so fp32, fp16 and
bf16 round-trip bit-exactly. Decoding is zero-copy: the returned tensor views the message buffer and
must be treated as read-only.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import msgpack
import numpy as np
import torch

from shared.errors import BadTensor, PayloadTooLarge

FORMAT_VERSION = 1
MAX_DIMS = 8  # hidden states are [n, D]; anything deeper is not a tensor this system sends
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_ITEMSIZE = {name: dtype.itemsize for name, dtype in DTYPES.items()}
# numpy (through which bytes cross into and out of tensors: a few µs less per message than torch's own
# view chain) has no bfloat16: its 16-bit patterns travel as int16.
_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "int64": np.int64, "int32": np.int32}
ENVELOPE_OVERHEAD = 256
"""Bytes reserved for the msgpack keys, dtype, shape and meta when sizing messages."""

# torch warns that a tensor over an immutable buffer is not writable; we never write to it.
warnings.filterwarnings("ignore", message="The given (buffer|NumPy array) is not writable")


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise BadTensor(f"dtype {dtype} cannot be sent; accepted: {', '.join(DTYPES)}") from None


def encode_tensor(tensor: torch.Tensor, meta: dict[str, Any] | None = None) -> bytes:
    """Pack `tensor` (any layout, any device) and small JSON-like `meta` into one message."""
    name = dtype_name(tensor.dtype)
    flat = tensor if tensor.is_cpu else tensor.cpu()
    if flat.requires_grad:
        flat = flat.detach()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise BadTensor("Prism's wire format needs a little-endian host")
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    # msgpack packs a memoryview as bin without an extra copy
    data = flat.numpy().data if flat.numel() else b""
    return msgpack.packb(
        {"v": FORMAT_VERSION, "dtype": name, "shape": list(flat.shape), "data": data, "meta": meta or {}}
    )


def decode_tensor(payload: bytes) -> tuple[torch.Tensor, dict[str, Any]]:
    """Inverse of `encode_tensor`; raises BadTensor for anything that is not a valid envelope."""
    try:
        envelope = msgpack.unpackb(payload)
    except Exception as exc:  # msgpack raises several unrelated types for corrupt input
        raise BadTensor(f"payload is not a msgpack tensor envelope: {exc}") from None
    if not isinstance(envelope, dict) or envelope.get("v") != FORMAT_VERSION:
        raise BadTensor(f"expected a tensor envelope with v={FORMAT_VERSION}")
    name = envelope.get("dtype", "")
    dtype = DTYPES.get(name)
    if dtype is None:
        raise BadTensor(f"unknown dtype {envelope.get('dtype')!r}; accepted: {', '.join(DTYPES)}")
    shape, data, meta = envelope.get("shape"), envelope.get("data"), envelope.get("meta", {})
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_dim(s) for s in shape):
        raise BadTensor(f"shape must be a list of at most {MAX_DIMS} ints in [0, 2**31), got {str(shape)[:100]}")
    if not isinstance(data, bytes) or not isinstance(meta, dict):
        raise BadTensor("data must be bytes and meta a map")
    expected = _numel(shape) * _ITEMSIZE[name]
    if len(data) != expected:
        raise BadTensor(f"data holds {len(data)} bytes but shape {shape} of {envelope['dtype']} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype), meta
    tensor = torch.from_numpy(np.ndarray(shape, dtype=_NUMPY[name], buffer=data))
    return (tensor.view(dtype) if dtype == torch.bfloat16 else tensor), meta


def check_size(payload: bytes, headers: dict[str, str] | None, max_payload: int) -> None:
    """Refuse a message the server would reject: nats-server counts headers plus payload."""
    size = len(payload) + _headers_size(headers)
    if size > max_payload:
        raise PayloadTooLarge(
            f"message of {size} bytes (payload {len(payload)} + headers) exceeds the server's "
            f"max_payload of {max_payload} bytes; send fewer tokens per message",
        )


def max_rows_per_message(row_bytes: int, max_payload: int) -> int:
    """How many rows of `row_bytes` fit in one message with room for envelope and headers."""
    room = max_payload - ENVELOPE_OVERHEAD - 1024
    if row_bytes <= 0 or room < row_bytes:
        raise PayloadTooLarge(f"one row of {row_bytes} bytes does not fit max_payload {max_payload}")
    return room // row_bytes


def _headers_size(headers: dict[str, str] | None) -> int:
    if not headers:
        return 0
    # "NATS/1.0\r\n" + "key: value\r\n" per header + final "\r\n"
    return 12 + sum(len(k) + len(v) + 4 for k, v in headers.items())


def _is_dim(size: object) -> bool:
    """An int (not a bool) that torch takes as a dimension: JSON-like input may hold 2**64 or true."""
    return isinstance(size, int) and not isinstance(size, bool) and 0 <= size < 2**31


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
