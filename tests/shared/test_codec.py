"""The tensor wire format: bit-exact round trips, corrupt input refused, size guard."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import check_size, decode_tensor, encode_tensor, max_rows_per_message
from shared.errors import BadTensor, PayloadTooLarge

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(FLOATS))
    shape = draw(st.lists(st.integers(0, 7), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    # random bit patterns cover NaN payloads, infinities and subnormals, not just "nice" values
    bits = torch.randint(-(2**15), 2**15, shape, generator=gen, dtype=torch.int32)
    if dtype == torch.float32:
        return (bits * 65536 + bits).view(torch.float32)
    return bits.to(torch.int16).view(dtype)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes, so NaN payloads compare too."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@given(tensors())
@settings(max_examples=200, deadline=None)
def test_round_trip_is_bit_exact(tensor: torch.Tensor) -> None:
    decoded, meta = decode_tensor(encode_tensor(tensor, {"batch": 7}))
    assert decoded.dtype == tensor.dtype
    assert decoded.shape == tensor.shape
    assert meta == {"batch": 7}
    assert torch.equal(_bits(decoded), _bits(tensor))


@given(tensors())
@settings(max_examples=50, deadline=None)
def test_non_contiguous_input(tensor: torch.Tensor) -> None:
    if tensor.dim() < 2:
        tensor = tensor.reshape(1, -1)
    transposed = tensor.transpose(0, -1)
    decoded, _ = decode_tensor(encode_tensor(transposed))
    assert decoded.shape == transposed.shape
    assert torch.equal(_bits(decoded), _bits(transposed))


def test_empty_batch() -> None:
    decoded, _ = decode_tensor(encode_tensor(torch.empty(0, 64, dtype=torch.bfloat16)))
    assert decoded.shape == (0, 64)
    assert decoded.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xc1garbage", "not a msgpack"),
        (msgpack.packb([1, 2]), "envelope"),
        (msgpack.packb({"v": 1, "dtype": "complex64", "shape": [1], "data": b"12345678"}), "unknown dtype"),
        (msgpack.packb({"v": 1, "dtype": "float32", "shape": [2, -1], "data": b""}), r"ints in \[0, 2\*\*31\)"),
        # empty data, and shapes torch cannot take (they once escaped as TypeError: no reply at all)
        (msgpack.packb({"v": 1, "dtype": "float32", "shape": [0, 2**63], "data": b""}), "ints in"),
        (msgpack.packb({"v": 1, "dtype": "float32", "shape": [0, 2**64 - 1], "data": b""}), "ints in"),
        (msgpack.packb({"v": 1, "dtype": "float32", "shape": [True, 192], "data": b"\0" * 768}), "ints in"),
        (msgpack.packb({"v": 1, "dtype": "float32", "shape": [1] * 9, "data": b"\0" * 4}), "at most 8"),
        (msgpack.packb({"v": 1, "dtype": "float32", "shape": [2, 3], "data": b"\0" * 20}), "needs 24"),
    ],
)
def test_corrupt_envelopes_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(BadTensor, match=message):
        decode_tensor(payload)


def test_size_guard_counts_headers() -> None:
    payload = b"\0" * 1000
    check_size(payload, None, 1000)
    with pytest.raises(PayloadTooLarge, match="exceeds the server's max_payload of 1000"):
        check_size(payload, {"Nats-Service-Error": "x"}, 1000)


def test_rows_per_message_fit() -> None:
    rows = max_rows_per_message(64 * 2, 64 * 1024)
    payload = encode_tensor(torch.zeros(rows, 64, dtype=torch.float16), {"id": 123456789})
    check_size(payload, {"A-Header": "value" * 20}, 64 * 1024)
    with pytest.raises(PayloadTooLarge):
        max_rows_per_message(10_000, 4_096)


def test_tensors_of_every_kind_a_service_sends_round_trip() -> None:
    with torch.inference_mode():  # what the services' threads make
        made = torch.randn(3, 4)
    grads = torch.randn(2, 3, requires_grad=True) * 2
    rows = torch.randn(100, 8)[10:20]  # a view into a bigger block
    for tensor in (made, grads.detach(), grads, rows, torch.tensor(3.5), torch.tensor(3.5, dtype=torch.bfloat16),
                   torch.arange(5), torch.arange(6, dtype=torch.int32).reshape(2, 3)):
        decoded, _ = decode_tensor(encode_tensor(tensor))
        assert decoded.dtype == tensor.dtype
        assert torch.equal(_bits(decoded), _bits(tensor.detach()))
