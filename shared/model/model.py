"""The dense part of an MoE decoder (work in progress: API skeleton)."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from shared.model.cache import KVCache
from shared.model.config import ModelConfig
from shared.model.moe import MoECall


@dataclass(frozen=True)
class Batch:
    """One forward step: for each sequence its cache slot and the tokens to append (ragged)."""

    slots: list[int]
    tokens: list[list[int]]


class MoEModel:
    """Embeddings, attention, norms, routers, shared experts, dense MLPs, lm head (no routed experts)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> MoEModel:
        raise NotImplementedError

    def new_cache(self, max_slots: int, max_len: int) -> KVCache:
        return KVCache(self.config, max_slots, max_len, dtype=self.dtype, device=self.device)

    def forward_steps(
        self, batch: Batch, cache: KVCache, all_logits: bool = False
    ) -> Generator[MoECall, Tensor, Tensor]:
        raise NotImplementedError
        yield  # pragma: no cover

    def forward(
        self, batch: Batch, cache: KVCache, experts: Callable[[MoECall], Tensor], all_logits: bool = False
    ) -> Tensor:
        steps = self.forward_steps(batch, cache, all_logits)
        try:
            call = next(steps)
            while True:
                call = steps.send(experts(call))
        except StopIteration as done:
            result: Tensor = done.value
            return result
