"""Reading Hugging Face checkpoint directories (work in progress: API skeleton)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from shared.model.config import ModelConfig, list_moe_layers
from shared.model.moe import ExpertWeights

__all__ = ["list_moe_layers", "load_config", "load_expert", "load_experts"]


def load_config(path: str | Path) -> ModelConfig:
    raise NotImplementedError


def load_expert(
    path: str | Path, layer: int, expert: int, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> ExpertWeights:
    raise NotImplementedError


def load_experts(
    path: str | Path, keys: Iterable[tuple[int, int]] | None = None, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[tuple[int, int], ExpertWeights]:
    raise NotImplementedError
