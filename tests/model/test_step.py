"""A step's index tensors (`build_context`): a decode step's short path gives what the general rule
gives, and a step that mixes a prompt with decodes still takes the general one."""

from __future__ import annotations

import pytest
import torch

from shared.model.cache import KVCache
from shared.model.config import preset
from shared.model.errors import InputError
from shared.model.step import build_context

CPU = torch.device("cpu")


def _cache(lengths: list[int]) -> KVCache:
    config = preset("tiny")
    cache = KVCache(config, max_slots=len(lengths), max_len=32)
    for slot, n in enumerate(lengths):
        assert cache.allocate() == slot
        cache.advance(slot, n)
    return cache


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.tolist()]


def test_a_decode_step_indexes_each_sequence_once() -> None:
    cache = _cache([4, 0, 7, 2])
    ctx = build_context([3, 1, 2], [[9], [8], [7]], cache, 100, CPU)
    assert _ints(ctx.token_ids) == [9, 8, 7]
    assert _ints(ctx.positions) == [2, 0, 7]  # each sequence's cached length
    assert _ints(ctx.seq_lens) == [3, 1, 8]
    assert _ints(ctx.token_slot) == [3, 1, 2]
    assert _ints(ctx.slots) == [3, 1, 2]
    assert _ints(ctx.token_seq) == [0, 1, 2]
    assert _ints(ctx.token_row) == [0, 0, 0]
    assert _ints(ctx.last_token) == [0, 1, 2]
    assert (ctx.q_max, ctx.k_max, ctx.counts, ctx.lens_before) == (1, 8, [1, 1, 1], [2, 0, 7])
    assert ctx.uniform
    assert ctx.slot_start is None
    assert ctx.first_slot == 3
    assert all(t.dtype == torch.int64 for t in (ctx.token_ids, ctx.positions, ctx.token_row, ctx.last_token))
    assert build_context([1, 2], [[5], [6]], cache, 100, CPU).slot_start == 1  # cache rows read as a view


def test_a_step_with_a_prompt_takes_the_general_path() -> None:
    cache = _cache([3, 0])
    ctx = build_context([0, 1], [[5], [6, 7, 8]], cache, 100, CPU)
    assert _ints(ctx.positions) == [3, 0, 1, 2]
    assert _ints(ctx.token_seq) == [0, 1, 1, 1]
    assert _ints(ctx.token_row) == [0, 0, 1, 2]
    assert _ints(ctx.last_token) == [0, 3]
    assert not ctx.uniform
    assert (ctx.q_max, ctx.k_max) == (3, 4)


def test_a_decode_step_is_checked_like_any_other() -> None:
    cache = _cache([1, 1])
    with pytest.raises(InputError, match="outside the vocabulary"):
        build_context([0, 1], [[5], [100]], cache, 100, CPU)
    with pytest.raises(InputError, match="twice"):
        build_context([0, 0], [[5], [6]], cache, 100, CPU)
