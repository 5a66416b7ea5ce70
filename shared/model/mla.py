"""DeepSeek multi-head latent attention (MLA) over the compressed KV cache.

Per token and layer MLA caches only the normed latent c_kv [R] and one rotary key k_pe [Dr] shared
by all heads (`KVCache` with `config.mla`); per-head keys and values are never stored. Two exact
rewritings of the same attention read that cache:

- absorbed: kv_b's key half W_UK is folded into the query (q_lat = q_nope W_UK, [H, R]) and its
  value half W_UV applied after attending, so every head attends over the shared latent rows
  directly (multi-query style). Cost per sequence ~ Q·H·P·(2R + Dr): the decode path.
- expanded: decompress per-head keys / values of the P cached tokens with kv_b
  (P·H·R·(Dn + Dv)) and attend as plain multi-head attention: cheaper for long prefills.

`MLAttention.mode` "auto" picks the cheaper form per step; both agree to rounding (tests check).
RoPE touches only the Dr rotary dims, in adjacent pairs (`rope_interleave`, DeepSeek's layout) or
in halves; the rotated dims come out de-interleaved for q and k alike, so q·k is unchanged.

Shape legend: T tokens, D hidden, H heads, R kv_lora_rank, Rq q_lora_rank, Dn qk_nope_head_dim,
Dr qk_rope_head_dim, Dv v_head_dim, B sequences, Q padded new tokens per sequence, P cached
positions read, C = R + Dr one cached row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.model.attention import Linear, load_linear, rms_norm
from shared.model.cache import KVCache
from shared.model.checkpoint import TensorReader
from shared.model.config import MLAConfig, ModelConfig
from shared.model.errors import ConfigError
from shared.model.rope import apply_rope
from shared.model.step import StepContext

Mode = Literal["auto", "absorbed", "expanded"]

# DeepSeek builds q_a_layernorm / kv_a_layernorm with RMSNorm's default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(Dn + Dr), times yarn's mscale(factor, mscale_all_dim)^2 when RoPE is scaled."""
    mla = _mla(config)
    scale = math.pow(mla.qk_head_dim, -0.5)
    rope = config.rope
    if rope.rope_type != "default" and rope.mscale_all_dim and rope.factor > 1:
        mscale = 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
        scale *= mscale * mscale
    return scale


def _mla(config: ModelConfig) -> MLAConfig:
    if config.mla is None:
        raise ConfigError(f"family {config.family} has no MLA settings (config.mla is None)")
    return config.mla


@dataclass(frozen=True)
class MLAttention:
    """One layer's MLA weights; `__call__` has the `Attention` protocol's signature."""

    q: Linear | None  # q_proj [H*(Dn+Dr), D] when there is no q-LoRA
    q_a: Linear | None  # [Rq, D]
    q_a_norm: Tensor | None  # [Rq]
    q_b: Linear | None  # [H*(Dn+Dr), Rq]
    kv_a: Linear  # kv_a_proj_with_mqa [R + Dr, D]
    kv_a_norm: Tensor  # [R]
    kv_b: Tensor  # kv_b_proj [H*(Dn+Dv), R]: per head, Dn key rows then Dv value rows
    o: Linear  # [D, H*Dv]
    dims: MLAConfig
    num_heads: int
    scale: float
    mode: Mode = "auto"

    @classmethod
    def load(cls, reader: TensorReader, config: ModelConfig, layer: int) -> MLAttention:
        m, p = _mla(config), f"model.layers.{layer}.self_attn"
        D, H, R, bias = config.hidden_size, config.num_heads, m.kv_lora_rank, m.attention_bias
        q = q_a = q_b = q_a_norm = None
        if m.q_lora_rank is None:
            q = load_linear(reader, f"{p}.q_proj", H * m.qk_head_dim, D, False)
        else:
            q_a = load_linear(reader, f"{p}.q_a_proj", m.q_lora_rank, D, bias)
            q_a_norm = reader.get(f"{p}.q_a_layernorm.weight", (m.q_lora_rank,))
            q_b = load_linear(reader, f"{p}.q_b_proj", H * m.qk_head_dim, m.q_lora_rank, False)
        return cls(
            q=q, q_a=q_a, q_a_norm=q_a_norm, q_b=q_b,
            kv_a=load_linear(reader, f"{p}.kv_a_proj_with_mqa", m.cache_width, D, bias),
            kv_a_norm=reader.get(f"{p}.kv_a_layernorm.weight", (R,)),
            kv_b=reader.get(f"{p}.kv_b_proj.weight", (H * (m.qk_nope_head_dim + m.v_head_dim), R)),
            o=load_linear(reader, f"{p}.o_proj", D, H * m.v_head_dim, bias),
            dims=m, num_heads=H, scale=softmax_scale(config),
        )

    @property
    def w_uk(self) -> Tensor:
        """Key half of kv_b per head, [H, Dn, R] (a view)."""
        return self.kv_b.view(self.num_heads, -1, self.dims.kv_lora_rank)[:, : self.dims.qk_nope_head_dim]

    @property
    def w_uv(self) -> Tensor:
        """Value half of kv_b per head, [H, Dv, R] (a view)."""
        return self.kv_b.view(self.num_heads, -1, self.dims.kv_lora_rank)[:, self.dims.qk_nope_head_dim :]

    def __call__(
        self, x: Tensor, ctx: StepContext, cos_sin: tuple[Tensor, Tensor], cache: KVCache, layer: int
    ) -> Tensor:
        """x [T, D] (normed) -> [T, D]; writes this step's latent rows into `cache`."""
        m, T, H = self.dims, x.shape[0], self.num_heads
        q = self.query(x).view(T, H, m.qk_head_dim)
        q_nope, q_pe = torch.split(q, [m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = torch.split(self.kv_a(x), [m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)  # [T, R], [T, Dr]
        c_kv = rms_norm(c_kv, self.kv_a_norm, LATENT_NORM_EPS)
        q_pe, k_pe = self.rope(q_pe, cos_sin), self.rope(k_pe[:, None], cos_sin)[:, 0]
        rows = cache.keys[layer]  # [S, 1, Pmax, C]
        rows[ctx.token_slot, 0, ctx.positions] = torch.cat((c_kv, k_pe), dim=-1)
        cached = _gather(rows, ctx)  # [B, P, C]
        if self.absorbs(ctx):
            out = self.absorbed(q_nope, q_pe, cached, ctx)
        else:
            out = self.expanded(q_nope, q_pe, cached, ctx)
        return self.o(out.reshape(T, H * m.v_head_dim))

    def query(self, x: Tensor) -> Tensor:
        """[T, D] -> [T, H*(Dn+Dr)], directly or through the normed q-LoRA bottleneck."""
        if self.q is not None:
            return self.q(x)
        if self.q_a is None or self.q_b is None or self.q_a_norm is None:
            raise ConfigError("MLAttention needs q_proj or all of q_a_proj, q_a_layernorm, q_b_proj")
        return self.q_b(rms_norm(self.q_a(x), self.q_a_norm, LATENT_NORM_EPS))

    def rope(self, x: Tensor, cos_sin: tuple[Tensor, Tensor]) -> Tensor:
        """Rotate x [T, h, Dr] by cos/sin [T, Dr] (cos(f, f) and the signed sine (-sin f, sin f),
        `Rotary.cos_sin`): pairs or halves."""
        cos, sin = cos_sin
        if not self.dims.rope_interleave:
            return apply_rope(x, cos, sin)
        half = cos.shape[-1] // 2
        c, s = cos[:, None, :half], sin[:, None, half:]  # the sine's second half is sin f itself
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    def absorbs(self, ctx: StepContext) -> bool:
        """Whether this step uses the absorbed form (mode, or the cheaper one per sequence and head)."""
        if self.mode != "auto":
            return self.mode == "absorbed"
        m, Q, P = self.dims, ctx.q_max, ctx.k_max
        absorbed = Q * P * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
        expanded = P * m.kv_lora_rank * (m.qk_nope_head_dim + m.v_head_dim) + Q * P * (m.qk_head_dim + m.v_head_dim)
        return absorbed <= expanded

    def absorbed(self, q_nope: Tensor, q_pe: Tensor, cached: Tensor, ctx: StepContext) -> Tensor:
        """Attend over the latent rows: q_nope [T, H, Dn], q_pe [T, H, Dr], cached [B, P, C] -> [T, H, Dv].

        All heads share one key / value row per position, so heads become extra query rows of a
        single-head attention ([B, 1, Q*H, C]) and the cache is read once, never repeated per head.
        """
        R = self.dims.kv_lora_rank
        q_lat = torch.einsum("thn,hnr->thr", q_nope, self.w_uk)  # [T, H, R]
        q = _pad(torch.cat((q_lat, q_pe), dim=-1), ctx)  # [B, Q, H, C]
        B, Q, H, C = q.shape
        mask = ctx.attention_mask(None)  # [B, 1, Q, P] or None
        if mask is not None:
            P = mask.shape[-1]
            mask = mask[:, :, :, None, :].expand(B, 1, Q, H, P).reshape(B, 1, Q * H, P)
        keys = cached[:, None]  # [B, 1, P, C]
        out = F.scaled_dot_product_attention(
            q.reshape(B, 1, Q * H, C), keys, keys[..., :R], attn_mask=mask, scale=self.scale
        )  # [B, 1, Q*H, R]
        out_lat = _unpad(out.view(B, Q, H, R), ctx)  # [T, H, R]
        return torch.einsum("thr,hvr->thv", out_lat, self.w_uv)

    def expanded(self, q_nope: Tensor, q_pe: Tensor, cached: Tensor, ctx: StepContext) -> Tensor:
        """Decompress per-head keys / values of the cached rows and attend: -> [T, H, Dv]."""
        m, H = self.dims, self.num_heads
        B, P, _ = cached.shape
        latent, k_pe = torch.split(cached, [m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)  # [B, P, R], [B, P, Dr]
        kv = F.linear(latent, self.kv_b).view(B, P, H, -1).transpose(1, 2)  # [B, H, P, Dn+Dv]
        k_nope, v = torch.split(kv, [m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None].expand(B, H, P, m.qk_rope_head_dim)), dim=-1)  # [B, H, P, Dn+Dr]
        q = _pad(torch.cat((q_nope, q_pe), dim=-1), ctx).transpose(1, 2)  # [B, H, Q, Dn+Dr]
        causal = ctx.causal_only(None)
        mask = None if causal else ctx.attention_mask(None)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)
        return _unpad(out.transpose(1, 2), ctx)  # [T, H, Dv]


def _gather(rows: Tensor, ctx: StepContext) -> Tensor:
    """Each sequence's first P cached rows: [S, 1, Pmax, C] -> [B, P, C] (a view for one sequence)."""
    if ctx.batch_size == 1:
        s = ctx.first_slot
        return rows[s : s + 1, 0, : ctx.k_max]
    return rows[ctx.slots, 0, : ctx.k_max]


def _pad(x: Tensor, ctx: StepContext) -> Tensor:
    """Packed [T, ...] -> padded [B, Q, ...] (padding rows are zeros)."""
    B, Q = ctx.batch_size, ctx.q_max
    if ctx.uniform:
        return x.view(B, Q, *x.shape[1:])
    out = x.new_zeros(B, Q, *x.shape[1:])
    out[ctx.token_seq, ctx.token_row] = x
    return out


def _unpad(y: Tensor, ctx: StepContext) -> Tensor:
    """Padded [B, Q, ...] -> packed [T, ...]."""
    if ctx.uniform:
        return y.reshape(-1, *y.shape[2:])
    return y[ctx.token_seq, ctx.token_row]
