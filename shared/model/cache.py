"""Slot-based key/value cache for continuous batching.

Each running sequence owns one slot; `allocate` hands out a free slot (its length starts at 0),
`free` returns it. The model writes a step's keys and values at positions
`length(slot) .. length(slot) + n - 1` of the slot and then advances the length with `advance`.

Multi-head latent attention (DeepSeek, `config.mla`) caches one compressed row per token and layer:
`keys[l]` is [S, 1, P, R + Dr] holding [latent (R) | rotary key (Dr)], and `values[l]` is a view of
its latent part (no bytes of its own): per token only R + Dr values per layer, as MLA promises.

Shape legend: L layers, S slots, Hkv key/value heads, P max_len positions, Dh head dim,
R kv_lora_rank, Dr qk_rope_head_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from shared.model.config import ModelConfig
from shared.model.errors import InputError


class KVCache:
    """Keys and values of every layer for `max_slots` sequences of up to `max_len` tokens."""

    def __init__(
        self,
        config: ModelConfig,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if max_slots <= 0 or max_len <= 0:
            raise InputError(f"KVCache needs max_slots > 0 and max_len > 0, got {max_slots}, {max_len}")
        self.max_slots = max_slots
        self.max_len = max_len
        shape = (max_slots, config.num_kv_heads, max_len, config.head_dim)  # [S, Hkv, P, Dh]
        if config.mla is not None:
            shape = (max_slots, 1, max_len, config.mla.cache_width)  # [S, 1, P, R + Dr]
        self.keys: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        if config.mla is not None:
            self.values: list[Tensor] = [k[..., : config.mla.kv_lora_rank] for k in self.keys]  # views
        else:
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self._values_are_views = config.mla is not None
        self._lengths = [0] * max_slots
        self._free = list(range(max_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._used: set[int] = set()

    def nbytes_per_token(self) -> int:
        """Bytes of cache storage per token position, over all layers (keys and values)."""
        tensors = self.keys if self._values_are_views else self.keys + self.values
        return sum(t.numel() * t.element_size() for t in tensors) // (self.max_slots * self.max_len)

    def allocate(self) -> int:
        """Take a free slot (length 0). Raises InputError when all slots are in use."""
        if not self._free:
            raise InputError(f"KVCache is full: all {self.max_slots} slots are in use")
        slot = self._free.pop()
        self._used.add(slot)
        self._lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Return `slot` to the pool; its contents become garbage."""
        self.check(slot)
        self._used.discard(slot)
        self._lengths[slot] = 0
        self._free.append(slot)

    def length(self, slot: int) -> int:
        """Tokens cached in `slot`."""
        self.check(slot)
        return self._lengths[slot]

    def reset(self, slot: int) -> None:
        """Forget the cached tokens of `slot` but keep it allocated."""
        self.check(slot)
        self._lengths[slot] = 0

    def num_free(self) -> int:
        """Slots that `allocate` can still hand out."""
        return len(self._free)

    def check(self, slot: int) -> None:
        """Raise InputError unless `slot` is allocated."""
        if slot not in self._used:
            raise InputError(f"cache slot {slot} is not allocated (allocated: {sorted(self._used)})")

    def check_room(self, slot: int, n: int) -> None:
        """Raise InputError if `n` more tokens do not fit in `slot`."""
        if self.length(slot) + n > self.max_len:
            raise InputError(
                f"cache slot {slot} holds {self._lengths[slot]} tokens; {n} more exceed max_len {self.max_len}"
            )

    def advance(self, slot: int, n: int) -> None:
        """Mark `n` more tokens of `slot` as written (called by the model after a step)."""
        self.check_room(slot, n)
        self._lengths[slot] += n
