"""DeepSeek-V2 / V3 routing: which K routed experts each token uses, and with which weights.

The rest of a DeepSeek layer reuses the shared pieces: MLA attention (`mla.py`), dense SwiGLU MLPs in
the first `first_k_dense_replace` layers, and `n_shared_experts` always-on experts fused into one MLP
that runs locally on every node (`model.SharedExpert` without a gate). Only routed experts cross the
expert seam.

Routing, in fp32 with the gate weight kept in fp32 (as DeepSeek and transformers do):
  scores = softmax(h W^T) (V2) or sigmoid(h W^T) (V3)                        [T, E]
  choice = scores + e_score_correction_bias (V3; steers selection, never the weights)
  grouped methods keep the `topk_group` best of `n_group` contiguous expert groups, a group ranked
  by its best choice score ("group_limited_greedy", V2) or the sum of its top-2 ("noaux_tc", V3)
  ids = top-k of choice; weights = scores[ids], renormalised (V3 `norm_topk_prob`), times
  `routed_scaling_factor`.

Shape legend: T tokens, D hidden, E routed experts, G groups, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.model.checkpoint import TensorReader
from shared.model.config import GroupRouting, ModelConfig
from shared.model.errors import ConfigError


def _fp32(reader: TensorReader, name: str, shape: tuple[int, ...]) -> Tensor:
    """Tensor `name` in fp32 even when the model runs in bf16 (routing must not be rounded twice)."""
    if reader.dtype == torch.float32:
        return reader.get(name, shape)
    with TensorReader(reader.directory, torch.float32, reader.device) as exact:
        return exact.get(name, shape)


@dataclass(frozen=True)
class DeepSeekRouter:
    """DeepSeek's gate for one MoE layer: h [T, D] -> ids [T, K] int64, weights [T, K] fp32."""

    weight: Tensor  # [E, D] fp32
    bias: Tensor | None  # [E] fp32 e_score_correction_bias (noaux_tc only)
    top_k: int
    routing: GroupRouting
    normalize: bool

    @classmethod
    def load(cls, reader: TensorReader, config: ModelConfig, layer: int) -> DeepSeekRouter:
        routing = config.routing
        if routing is None:
            raise ConfigError(f"family {config.family} has no routing settings (config.routing is None)")
        p, E = f"model.layers.{layer}.mlp.gate", config.num_experts
        bias = None
        if routing.topk_method == "noaux_tc":
            bias = _fp32(reader, f"{p}.e_score_correction_bias", (E,))
        return cls(
            weight=_fp32(reader, f"{p}.weight", (E, config.hidden_size)),
            bias=bias,
            top_k=config.top_k,
            routing=routing,
            normalize=config.norm_topk_prob,
        )

    def __call__(self, h: Tensor) -> tuple[Tensor, Tensor]:
        logits = F.linear(h.float(), self.weight)  # [T, E]
        scores = logits.softmax(dim=-1) if self.routing.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.bias is None else scores + self.bias
        if self.routing.topk_method != "greedy":
            choice = self.limit_groups(choice)
        ids = torch.topk(choice, self.top_k, dim=-1).indices  # [T, K]
        weights = scores.gather(1, ids)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.routing.routed_scaling_factor

    def limit_groups(self, choice: Tensor) -> Tensor:
        """Mask (-inf) the experts outside each token's `topk_group` best groups: [T, E] -> [T, E]."""
        T, E = choice.shape
        G = self.routing.n_group
        grouped = choice.view(T, G, E // G)
        if self.routing.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        else:
            group_scores = grouped.max(dim=-1).values
        keep = torch.topk(group_scores, self.routing.topk_group, dim=-1).indices  # [T, topk_group]
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # [T, G]
        return grouped.masked_fill(~allowed[:, :, None], float("-inf")).view(T, E)
