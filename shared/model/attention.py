"""Attention variants and RMSNorm.

`GQAAttention` is multi-head attention with grouped key/value heads, rotary embeddings, and the
per-family options: q/k/v biases (Qwen2-MoE), o bias (OLMoE/Qwen3 `attention_bias`), q/k RMSNorm per
head (Qwen3-MoE) or over the whole projection (OLMoE), clipping of q, k, v (OLMoE `clip_qkv`), a
sliding window. A family with a different attention (DeepSeek's MLA) adds its own class with the
same `load` / `__call__` shape and registers it in `ATTENTIONS`.

Shape legend: T tokens, D hidden, H query heads, Hkv key/value heads, Dh head dim, B sequences,
Q padded new tokens per sequence, P cached positions read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.model.cache import KVCache
from shared.model.checkpoint import TensorReader
from shared.model.config import ModelConfig
from shared.model.rope import apply_rope
from shared.model.step import StepContext


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, computed in fp32 and cast back (as transformers does)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class Attention(Protocol):
    """What a decoder layer needs from its attention block."""

    def __call__(
        self, x: Tensor, ctx: StepContext, cos_sin: tuple[Tensor, Tensor], cache: KVCache, layer: int
    ) -> Tensor: ...


@dataclass(frozen=True)
class Linear:
    """weight [out, in] and optional bias [out]."""

    weight: Tensor
    bias: Tensor | None

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def load_linear(reader: TensorReader, name: str, out_dim: int, in_dim: int, bias: bool) -> Linear:
    """`{name}.weight` [out, in] and, if `bias`, `{name}.bias` [out]."""
    b = reader.get(f"{name}.bias", (out_dim,)) if bias else None
    return Linear(reader.get(f"{name}.weight", (out_dim, in_dim)), b)


@dataclass(frozen=True)
class GQAAttention:
    """Grouped-query attention with the Mixtral / Qwen / OLMoE options of `ModelConfig`."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    q_norm: Tensor | None  # [Dh] per head, or [H * Dh] over the projection
    k_norm: Tensor | None  # [Dh] or [Hkv * Dh]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    per_head_norm: bool
    clip: float | None
    window: int | None

    @classmethod
    def load(cls, reader: TensorReader, config: ModelConfig, layer: int) -> GQAAttention:
        p = f"model.layers.{layer}.self_attn"
        D, H, Hkv, Dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        norms: tuple[Tensor | None, Tensor | None] = (None, None)
        if config.qk_norm == "per_head":
            norms = (reader.get(f"{p}.q_norm.weight", (Dh,)), reader.get(f"{p}.k_norm.weight", (Dh,)))
        elif config.qk_norm == "full":
            norms = (reader.get(f"{p}.q_norm.weight", (H * Dh,)), reader.get(f"{p}.k_norm.weight", (Hkv * Dh,)))
        return cls(
            q=load_linear(reader, f"{p}.q_proj", H * Dh, D, config.qkv_bias),
            k=load_linear(reader, f"{p}.k_proj", Hkv * Dh, D, config.qkv_bias),
            v=load_linear(reader, f"{p}.v_proj", Hkv * Dh, D, config.qkv_bias),
            o=load_linear(reader, f"{p}.o_proj", D, H * Dh, config.o_bias),
            q_norm=norms[0], k_norm=norms[1],
            num_heads=H, num_kv_heads=Hkv, head_dim=Dh, norm_eps=config.rms_norm_eps,
            per_head_norm=config.qk_norm == "per_head", clip=config.clip_qkv,
            window=config.sliding_window if layer in config.sliding_layers else None,
        )

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [T, H, Dh], k [T, Hkv, Dh], v [T, Hkv, Dh] before rotary embedding."""
        T = x.shape[0]
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.q_norm is not None and self.k_norm is not None and not self.per_head_norm:
            q, k = rms_norm(q, self.q_norm, self.norm_eps), rms_norm(k, self.k_norm, self.norm_eps)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None and self.per_head_norm:
            q, k = rms_norm(q, self.q_norm, self.norm_eps), rms_norm(k, self.k_norm, self.norm_eps)
        return q, k, v.view(T, self.num_kv_heads, self.head_dim)

    def __call__(
        self, x: Tensor, ctx: StepContext, cos_sin: tuple[Tensor, Tensor], cache: KVCache, layer: int
    ) -> Tensor:
        """x [T, D] (normed) -> [T, D]; writes this step's keys and values into `cache`."""
        q, k, v = self.project(x)
        cos, sin = cos_sin
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = cache.keys[layer], cache.values[layer]  # [S, Hkv, Pmax, Dh]
        keys[ctx.token_slot, :, ctx.positions] = k
        values[ctx.token_slot, :, ctx.positions] = v
        out = attend(q, keys, values, ctx, self.window)  # [T, H, Dh]
        return self.o(out.reshape(x.shape[0], self.num_heads * self.head_dim))


def attend(q: Tensor, keys: Tensor, values: Tensor, ctx: StepContext, window: int | None) -> Tensor:
    """Scaled dot-product attention of the step's queries q [T, H, Dh] against each sequence's
    cached keys/values ([S, Hkv, Pmax, Dh] caches, already holding this step): [T, H, Dh]."""
    B, Q, P = ctx.batch_size, ctx.q_max, ctx.k_max
    if ctx.slot_start is not None:  # consecutive slots (always for B == 1): views, no copy
        s = ctx.slot_start
        k, v = keys[s : s + B, :, :P], values[s : s + B, :, :P]  # [B, Hkv, P, Dh]
    else:
        k, v = keys[ctx.slots, :, :P], values[ctx.slots, :, :P]  # gathered copies
    if ctx.uniform:
        qb = q.view(B, Q, *q.shape[1:])
    else:
        qb = q.new_zeros(B, Q, *q.shape[1:])
        qb[ctx.token_seq, ctx.token_row] = q
    causal = ctx.causal_only(window)
    mask = None if causal else ctx.attention_mask(window)
    out = F.scaled_dot_product_attention(
        qb.transpose(1, 2), k, v, attn_mask=mask, is_causal=causal, enable_gqa=True
    ).transpose(1, 2)  # [B, Q, H, Dh]
    if ctx.uniform:
        return out.reshape(q.shape)
    return out[ctx.token_seq, ctx.token_row]


AttentionLoader = Callable[[TensorReader, ModelConfig, int], Attention]


def _load_mla(reader: TensorReader, config: ModelConfig, layer: int) -> Attention:
    from shared.model.mla import MLAttention  # mla.py builds on this module: imported on use

    return MLAttention.load(reader, config, layer)


# family -> how to load its attention block of one layer.
ATTENTIONS: dict[str, AttentionLoader] = {
    "mixtral": GQAAttention.load,
    "qwen2_moe": GQAAttention.load,
    "qwen3_moe": GQAAttention.load,
    "olmoe": GQAAttention.load,
    "deepseek_v2": _load_mla,
    "deepseek_v3": _load_mla,
}
