"""Token sampling: greedy, temperature, nucleus (top-p), reproducible per request.

Each sequence gets its own `torch.Generator` seeded from its `SamplingParams.seed`, so the tokens
a request draws do not depend on what else shares the batch. Sampling runs on the CPU in fp32 so
that a seed gives the same tokens on every device.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from shared.model.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy (argmax); top_p in (0, 1]; seed None = nondeterministic."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Draws tokens for many sequences, each from its own seeded generator.

    `key` names the sequence (a request id, a slot); `release(key)` drops its generator.
    """

    def __init__(self) -> None:
        self._generators: dict[Hashable, torch.Generator] = {}

    def generator(self, key: Hashable, params: SamplingParams) -> torch.Generator:
        """The generator of sequence `key`, created (and seeded) on first use."""
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device="cpu")
            if params.seed is None:
                gen.seed()
            else:
                gen.manual_seed(params.seed)
            self._generators[key] = gen
        return gen

    def release(self, key: Hashable) -> None:
        """Forget the generator of sequence `key` (when its request ends)."""
        self._generators.pop(key, None)

    def sample(self, logits: Tensor, params: SamplingParams, key: Hashable = 0) -> int:
        """One token id from `logits` [V] under `params`."""
        if logits.dim() != 1:
            raise InputError(f"sample expects logits of shape [V], got {tuple(logits.shape)}")
        if params.greedy:
            return int(torch.argmax(logits).item())
        logits = logits.detach().float().cpu()
        # Scaled from the maximum down: a tiny temperature (1e-40 ≈ greedy; a denormal may count as 0
        # in the division) gives -inf for the others and 0 for the best, never inf or nan.
        top = logits.max()
        probs = torch.softmax(torch.where(logits == top, 0.0, (logits - top) / params.temperature), dim=-1)
        if params.top_p < 1.0:
            probs = _top_p_filter(probs, params.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generator(key, params)).item())


def _top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches `top_p`: [V] -> [V]."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop = mass_before >= top_p
    drop[0] = False  # the most likely token always stays (a top_p that rounds to 0 in float32 too)
    sorted_probs[drop] = 0.0
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return kept / kept.sum()
