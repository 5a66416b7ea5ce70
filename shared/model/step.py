"""The per-step bookkeeping of a ragged batch: positions, cache writes, padding and masks.

A step appends n_b tokens to each sequence b (prefill: many, decode: one). Tokens are packed
sequence-major into [T, ...]; attention pads queries to [B, Q, ...] and reads each sequence's
cached keys [B, ..., P_max]. Built once per step and shared by every layer.

Shape legend: T tokens in the step, B sequences, Q = max n_b, P = max cached length after the
step, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from shared.model.cache import KVCache
from shared.model.errors import InputError


@dataclass(frozen=True)
class StepContext:
    """Index tensors (on the model's device) for one forward step."""

    token_ids: Tensor  # [T] int64
    positions: Tensor  # [T] int64, position of each token in its sequence
    seq_lens: Tensor  # [T] int64, length of each token's sequence after the step
    token_slot: Tensor  # [T] int64, cache slot of each token
    token_seq: Tensor  # [T] int64, batch row b of each token
    token_row: Tensor  # [T] int64, index of the token among its sequence's new tokens
    slots: Tensor  # [B] int64
    first_slot: int  # slots[0], for the single-sequence fast path
    lens_before: list[int]  # [B] cached tokens before the step
    counts: list[int]  # [B] new tokens per sequence
    q_max: int  # Q
    k_max: int  # P
    last_token: Tensor  # [B] int64, packed index of each sequence's last new token
    uniform: bool  # every sequence appends Q tokens: [T] reshapes to [B, Q] directly
    slot_start: int | None  # slots are slot_start, slot_start + 1, ...: caches are read as views
    _masks: dict[int | None, Tensor | None] = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return len(self.counts)

    def attention_mask(self, window: int | None) -> Tensor | None:
        """Boolean mask [B, 1, Q, P] (True = attend), or None when no key needs masking.

        Causal against each sequence's own positions; keys past a sequence's length are masked;
        with `window`, keys at or before position - window too (transformers' sliding window).
        Built once per step and window, then shared by the layers.
        """
        if window not in self._masks:
            self._masks[window] = self._build_mask(window)
        return self._masks[window]

    def _build_mask(self, window: int | None) -> Tensor | None:
        if window is None and self.q_max == 1 and all(
            before + 1 == self.k_max for before in self.lens_before
        ):
            return None  # decode with equal lengths: every cached key is visible
        device = self.token_ids.device
        before = torch.tensor(self.lens_before, device=device)[:, None]  # [B, 1]
        count = torch.tensor(self.counts, device=device)[:, None]
        rows = torch.arange(self.q_max, device=device)[None, :]  # [1, Q]
        # Padding query rows repeat the sequence's last row, so no row is fully masked.
        q_pos = before + torch.minimum(rows, count - 1)  # [B, Q]
        k_pos = torch.arange(self.k_max, device=device)  # [P]
        mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, Q, P]
        if window is not None:
            mask &= k_pos[None, None, :] > q_pos[:, :, None] - window
        return mask[:, None]

    def causal_only(self, window: int | None) -> bool:
        """One sequence prefilled from an empty cache: plain causal attention, no mask tensor."""
        return window is None and self.batch_size == 1 and self.lens_before[0] == 0


def build_context(
    slots: list[int], tokens: list[list[int]], cache: KVCache, vocab_size: int, device: torch.device
) -> StepContext:
    """Validate a step (slots allocated and distinct, ids in the vocabulary, room in the cache)
    and build its index tensors."""
    if not slots or len(slots) != len(tokens):
        raise InputError(f"a batch needs one token list per slot; got {len(slots)} slots, {len(tokens)} lists")
    if len(set(slots)) != len(slots):
        raise InputError(f"a batch lists a cache slot twice: {slots}")
    counts = [len(t) for t in tokens]
    for slot, toks in zip(slots, tokens, strict=True):
        if not toks:
            raise InputError(f"slot {slot}: a sequence in a batch needs at least one token")
        cache.check_room(slot, len(toks))
        bad = [t for t in toks if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"slot {slot}: token ids {bad[:5]} outside the vocabulary 0..{vocab_size - 1}")
    before = [cache.length(s) for s in slots]
    flat = [t for toks in tokens for t in toks]
    if all(n == 1 for n in counts):
        return _decode_context(slots, flat, before, device)
    count_t = torch.tensor(counts, device=device)
    seq = torch.repeat_interleave(torch.arange(len(slots), device=device), count_t)  # [T]
    starts = torch.cumsum(count_t, 0) - count_t  # [B]
    row = torch.arange(len(flat), device=device) - starts[seq]
    before_t = torch.tensor(before, device=device)
    slots_t = torch.tensor(slots, device=device)
    return StepContext(
        token_ids=torch.tensor(flat, dtype=torch.int64, device=device),
        positions=before_t[seq] + row,
        seq_lens=(before_t + count_t)[seq],
        token_slot=slots_t[seq],
        token_seq=seq,
        token_row=row,
        slots=slots_t,
        first_slot=slots[0],
        lens_before=before,
        counts=counts,
        q_max=max(counts),
        k_max=max(b + n for b, n in zip(before, counts, strict=True)),
        last_token=starts + count_t - 1,
        uniform=all(n == counts[0] for n in counts),
        slot_start=_slot_start(slots),
    )


def _decode_context(slots: list[int], flat: list[int], before: list[int], device: torch.device) -> StepContext:
    """`build_context` of a step that appends one token to each sequence (every decode step): token b is
    sequence b's, so most index tensors are one another; half the tensor ops, each a copy to the device."""
    n = len(slots)
    before_t = torch.tensor(before, device=device)
    seq = torch.arange(n, device=device)
    slots_t = torch.tensor(slots, device=device)
    return StepContext(
        token_ids=torch.tensor(flat, dtype=torch.int64, device=device),
        positions=before_t,
        seq_lens=before_t + 1,
        token_slot=slots_t,
        token_seq=seq,
        token_row=torch.zeros(n, dtype=torch.int64, device=device),
        slots=slots_t,
        first_slot=slots[0],
        lens_before=before,
        counts=[1] * n,
        q_max=1,
        k_max=max(before) + 1,
        last_token=seq,
        uniform=True,
        slot_start=_slot_start(slots),
    )


def _slot_start(slots: list[int]) -> int | None:
    """slots[0] when the slots run slots[0], slots[0] + 1, ... (caches are then read as views), else None."""
    return slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None
