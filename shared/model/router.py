"""Routers: which K experts each token goes to, and with which weights.

Every supported family scores experts with a linear gate, takes a softmax in fp32, keeps the top
K, and optionally renormalises them (`norm_topk_prob`; Mixtral always). A family with another
rule (DeepSeek's grouped top-k, V3's sigmoid scores with a correction bias) adds a router class
and registers it in `ROUTERS`.

Shape legend: T tokens, D hidden, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.model.checkpoint import TensorReader
from shared.model.config import ModelConfig
from shared.model.deepseek import DeepSeekRouter
from shared.model.errors import CheckpointError
from shared.model.families import family_of


class Router(Protocol):
    def __call__(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h [T, D] -> expert ids [T, K] int64, weights [T, K]."""
        ...


@dataclass(frozen=True)
class SoftmaxTopK:
    """softmax(h @ W^T) in fp32 -> top-k -> optional renormalisation.

    keep_fp32: return fp32 weights (Mixtral) instead of casting to the model dtype (Qwen, OLMoE).
    """

    weight: Tensor  # [E, D]
    top_k: int
    normalize: bool
    keep_fp32: bool

    @classmethod
    def load(cls, reader: TensorReader, config: ModelConfig, layer: int) -> SoftmaxTopK:
        shape = (config.num_experts, config.hidden_size)
        names = [f"model.layers.{layer}.{moe}.gate.weight" for moe in family_of(config).moe_prefixes]
        name = reader.first(names)
        if name is None:
            raise CheckpointError(f"checkpoint {reader.directory} has no router weight; tried {', '.join(names)}")
        return cls(reader.get(name, shape), config.top_k, config.norm_topk_prob, config.router_weights_fp32)

    def __call__(self, h: Tensor) -> tuple[Tensor, Tensor]:
        logits = F.linear(h, self.weight)  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.keep_fp32:
            weights = weights.to(logits.dtype)
        return ids, weights


RouterLoader = Callable[[TensorReader, ModelConfig, int], Router]

# family -> how to load its router of one MoE layer.
ROUTERS: dict[str, RouterLoader] = {
    "mixtral": SoftmaxTopK.load,
    "qwen2_moe": SoftmaxTopK.load,
    "qwen3_moe": SoftmaxTopK.load,
    "olmoe": SoftmaxTopK.load,
    "deepseek_v2": DeepSeekRouter.load,
    "deepseek_v3": DeepSeekRouter.load,
}
