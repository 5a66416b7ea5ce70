"""Rotary position embeddings: default, linear, dynamic NTK, YaRN and Llama-3 frequency rules.

The frequency rules follow transformers' `modeling_rope_utils` so that logits match it.
Shape legend: T tokens, H heads, Dh head dim (rotated in two halves, "rotate_half" convention).

The sine comes pre-signed (its first half negated, `Rotary.cos_sin`), so a rotation rolls x's halves
instead of negating one and concatenating: x·cos + roll(x)·sin, the same numbers to the bit (negation
is exact) in fewer ops per layer, computed once per step for every layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from shared.model.config import ModelConfig, RopeConfig
from shared.model.errors import UnsupportedModelError


def _base_inv_freq(theta: float, dim: int, device: torch.device) -> Tensor:
    """1 / theta^(2i/dim) for i < dim/2, fp32: [Dh/2]."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float) / dim
    return 1.0 / (theta**exponents)


def _llama3(rope: RopeConfig, inv_freq: Tensor) -> Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short kept, a smooth ramp between."""
    old_len = float(rope.original_max_position_embeddings or 0)
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeConfig, dim: int, device: torch.device) -> tuple[Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, scale attention."""
    factor, base = rope.factor, rope.theta
    original = float(rope.original_max_position_embeddings or 0)
    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).to(torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    keep = 1 - ramp  # 1 where the frequency is extrapolated unchanged
    return interpolation * (1 - keep) + extrapolation * keep, float(attention)


def _dynamic_inv_freq(rope: RopeConfig, dim: int, max_pos: int, seq_len: int, device: torch.device) -> Tensor:
    """Dynamic NTK: the base grows with the sequence length once it exceeds max_pos."""
    seq_len = max(seq_len, max_pos)
    base = rope.theta * ((rope.factor * seq_len / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim, device)


class Rotary:
    """Per-token cos/sin tables for one model: `cos_sin(positions, seq_lens) -> ([T, Dh], [T, Dh])`, the
    sine pre-signed for `apply_rope`."""

    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        rope, dim = config.rope, config.head_dim
        self.rope, self.dim, self.device = rope, dim, device
        self.max_pos = config.max_position_embeddings
        self.scaling = 1.0
        if rope.rope_type == "default":
            self.inv_freq = _base_inv_freq(rope.theta, dim, device)
        elif rope.rope_type == "linear":
            self.inv_freq = _base_inv_freq(rope.theta, dim, device) / rope.factor
        elif rope.rope_type == "dynamic":
            self.inv_freq = _dynamic_inv_freq(rope, dim, self.max_pos, self.max_pos, device)
        elif rope.rope_type == "llama3":
            self.inv_freq = _llama3(rope, _base_inv_freq(rope.theta, dim, device))
        elif rope.rope_type == "yarn":
            self.inv_freq, self.scaling = _yarn(rope, dim, device)
        else:
            raise UnsupportedModelError(f"rope type {rope.rope_type!r} is not supported")

    def cos_sin(self, positions: Tensor, seq_lens: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin for `positions` [T] (int64); `seq_lens` [T] is each token's sequence length
        after this step (used by dynamic RoPE only). Returns two [T, Dh] tensors in `dtype`: cos(f, f)
        and the signed sine (-sin f, sin f) of the token's frequencies f [T, Dh/2]."""
        inv_freq = self._inv_freq_per_token(seq_lens)  # [Dh/2] or [T, Dh/2]
        freqs = positions[:, None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        half = sin.shape[-1] // 2
        sin[:, :half].neg_()
        return cos.to(dtype), sin.to(dtype)

    def _inv_freq_per_token(self, seq_lens: Tensor) -> Tensor:
        if self.rope.rope_type != "dynamic" or int(seq_lens.max()) <= self.max_pos:
            return self.inv_freq
        # Past the trained length each sequence's base depends on its own length (transformers
        # recomputes it from the step's longest sequence; for one sequence the two agree).
        table = self.inv_freq.expand(seq_lens.numel(), -1).clone()
        for length in sorted(set(seq_lens.tolist())):
            if length > self.max_pos:
                freq = _dynamic_inv_freq(self.rope, self.dim, self.max_pos, length, self.device)
                table[seq_lens == length] = freq
        return table


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` [T, H, Dh] by per-token cos and signed sin [T, Dh] (`Rotary.cos_sin`): x·cos +
    rotate_half(x)·sin of the usual form, (x1, x2) -> (-x2, x1), as a roll of the halves."""
    return x * cos[:, None, :] + x.roll(x.shape[-1] // 2, -1) * sin[:, None, :]
