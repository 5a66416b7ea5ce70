"""The dense part of an MoE decoder, with the expert seam as a generator.

`MoEModel` holds embeddings, attention, norms, routers, shared experts, dense MLP layers and the
lm head. It never holds routed experts: `forward_steps` yields one `MoECall` per MoE layer and
expects the combined routed output back through `send()`. `forward` drives it with any callable
(`LocalExperts` in-process; a gating service sends the groups over the network instead).

The generator keeps no thread-local state (no grad-mode context spans a `yield`; all weights are
plain tensors without `requires_grad`), so it may be resumed from another thread.

Shape legend: T tokens in the step (all sequences packed), B sequences, D hidden, V vocabulary,
K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.model.attention import ATTENTIONS, Attention, rms_norm
from shared.model.cache import KVCache
from shared.model.checkpoint import TensorReader, load_config
from shared.model.config import ModelConfig
from shared.model.errors import InputError
from shared.model.families import family_of
from shared.model.moe import MoECall
from shared.model.rope import Rotary
from shared.model.router import ROUTERS, Router
from shared.model.step import StepContext, build_context


@dataclass(frozen=True)
class Batch:
    """One forward step: each sequence's cache slot and the tokens to append (prefill: many,
    decode: one; lengths may differ)."""

    slots: list[int]
    tokens: list[list[int]]


@dataclass(frozen=True)
class DenseMLP:
    """A SwiGLU MLP that stays in the dense model (dense layers, shared experts): separate gate
    and up matmuls, as transformers computes these (routed experts fuse them: `moe.py`)."""

    gate: Tensor  # [I, D]
    up: Tensor  # [I, D]
    down: Tensor  # [D, I]

    def __call__(self, h: Tensor) -> Tensor:
        """[T, D] -> [T, D]."""
        return F.linear(F.silu(F.linear(h, self.gate)) * F.linear(h, self.up), self.down)


@dataclass(frozen=True)
class SharedExpert:
    """Qwen2-MoE's always-on expert, scaled by sigmoid(h @ gate^T) when it has a gate."""

    mlp: DenseMLP
    gate: Tensor | None  # [1, D]

    def __call__(self, h: Tensor) -> Tensor:
        out = self.mlp(h)
        if self.gate is None:
            return out
        return torch.sigmoid(F.linear(h, self.gate)) * out


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer: attention, then either a dense MLP or a routed MoE (+ shared expert)."""

    index: int
    input_norm: Tensor  # [D]
    post_norm: Tensor  # [D]
    attention: Attention
    dense: DenseMLP | None  # dense SwiGLU MLP of a non-MoE layer
    router: Router | None
    shared: SharedExpert | None


def _load_mlp(reader: TensorReader, prefix: str, hidden: int, inner: int) -> DenseMLP:
    return DenseMLP(
        gate=reader.get(f"{prefix}.gate_proj.weight", (inner, hidden)),
        up=reader.get(f"{prefix}.up_proj.weight", (inner, hidden)),
        down=reader.get(f"{prefix}.down_proj.weight", (hidden, inner)),
    )


def _load_layer(reader: TensorReader, config: ModelConfig, i: int) -> DecoderLayer:
    D, p = config.hidden_size, f"model.layers.{i}"
    dense = router = shared = None
    if i in config.moe_layers:
        router = ROUTERS[config.family](reader, config, i)
        if config.shared_expert_intermediate_size:
            gate = reader.get(f"{p}.mlp.shared_expert_gate.weight", (1, D)) if config.shared_expert_gate else None
            name = f"{p}.mlp.{family_of(config).shared_expert}"
            mlp = _load_mlp(reader, name, D, config.shared_expert_intermediate_size)
            shared = SharedExpert(mlp, gate)
    else:
        dense = _load_mlp(reader, f"{p}.mlp", D, config.intermediate_size)
    return DecoderLayer(
        index=i,
        input_norm=reader.get(f"{p}.input_layernorm.weight", (D,)),
        post_norm=reader.get(f"{p}.post_attention_layernorm.weight", (D,)),
        attention=ATTENTIONS[config.family](reader, config, i),
        dense=dense, router=router, shared=shared,
    )


@dataclass(frozen=True)
class LayerStep:
    """What the layers of one step share: its index tensors, rotary tables and the cache it writes."""

    ctx: StepContext
    cos_sin: tuple[Tensor, Tensor]
    cache: KVCache

    def embed(self, table: Tensor) -> Tensor:
        """Token embeddings [T, D] of the step's tokens."""
        return F.embedding(self.ctx.token_ids, table)

    def advance(self) -> None:
        """The step is done: each sequence's cached length grows by its new tokens."""
        for slot, n in zip(self.ctx.slots.tolist(), self.ctx.counts, strict=True):
            self.cache.advance(slot, n)


class MoEModel:
    """The dense part of one MoE decoder model, on one device in one dtype."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        embed: Tensor,
        layers: list[DecoderLayer],
        norm: Tensor,
        lm_head: Tensor,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.config = config
        self.embed = embed  # [V, D]
        self.layers = layers
        self.norm = norm  # [D]
        self.lm_head = lm_head  # [V, D]
        self.dtype = dtype
        self.device = device
        self.rotary = Rotary(config, device)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> MoEModel:
        """Load everything but the routed experts from a Hugging Face checkpoint directory."""
        config = load_config(path)
        dev = torch.device(device)
        V, D = config.vocab_size, config.hidden_size
        with TensorReader(path, dtype, dev) as reader:
            embed = reader.get("model.embed_tokens.weight", (V, D))
            layers = [_load_layer(reader, config, i) for i in range(config.num_layers)]
            norm = reader.get("model.norm.weight", (D,))
            if config.tie_word_embeddings and not reader.has("lm_head.weight"):
                lm_head = embed
            else:
                lm_head = reader.get("lm_head.weight", (V, D))
        return cls(config, embed=embed, layers=layers, norm=norm, lm_head=lm_head, dtype=dtype, device=dev)

    def new_cache(self, max_slots: int, max_len: int) -> KVCache:
        """A KV cache for `max_slots` sequences of up to `max_len` tokens, in the model's dtype."""
        return KVCache(self.config, max_slots, max_len, dtype=self.dtype, device=self.device)

    def forward_steps(
        self, batch: Batch, cache: KVCache, all_logits: bool = False
    ) -> Generator[MoECall, Tensor, Tensor]:
        """Run one step; yield a MoECall per MoE layer and receive its combined output [T, D].

        Returns logits [B, V] of each sequence's last new token, or [T, V] for every token when
        `all_logits`. The cache lengths advance only when the step completes.
        """
        step = self.begin_step(batch, cache)
        x = yield from self.layer_steps(step, step.embed(self.embed), 0, self.config.num_layers)
        return self.end_step(step, x, all_logits)

    def begin_step(self, batch: Batch, cache: KVCache) -> LayerStep:
        """Validate a step of `batch` against `cache` and build what its layers share."""
        if len(cache.keys) != self.config.num_layers:
            raise InputError(f"cache has {len(cache.keys)} layers, the model {self.config.num_layers}")
        ctx = build_context(batch.slots, batch.tokens, cache, self.config.vocab_size, self.device)
        return LayerStep(ctx, self.rotary.cos_sin(ctx.positions, ctx.seq_lens, self.dtype), cache)

    def segment_step(self, slots: list[int], counts: list[int], cache: KVCache) -> LayerStep:
        """A step of a layer range without the tokens (a route's segment on another node): the
        sequences' slots in `cache` and how many tokens each appends."""
        ctx = build_context(slots, [[0] * n for n in counts], cache, self.config.vocab_size, self.device)
        return LayerStep(ctx, self.rotary.cos_sin(ctx.positions, ctx.seq_lens, self.dtype), cache)

    def layer_steps(self, step: LayerStep, x: Tensor, start: int, end: int) -> Generator[MoECall, Tensor, Tensor]:
        """Layers `start .. end - 1` on hidden states x [T, D]; yields a MoECall per MoE layer and
        returns x after the last one."""
        want = (len(step.ctx.token_ids), self.config.hidden_size)
        if not 0 <= start <= end <= self.config.num_layers or tuple(x.shape) != want:
            raise InputError(f"layers {start}..{end} of {self.config.num_layers} on hidden states {tuple(x.shape)}")
        eps = self.config.rms_norm_eps
        for layer in self.layers[start:end]:
            x = x + layer.attention(rms_norm(x, layer.input_norm, eps), step.ctx, step.cos_sin, step.cache, layer.index)
            h = rms_norm(x, layer.post_norm, eps)
            if layer.router is None:
                x = x + _dense(layer)(h)
                continue
            ids, weights = layer.router(h)
            routed = yield MoECall(layer.index, h, ids, weights)
            x = x + self._moe_output(layer, h, routed)
        return x

    def end_step(self, step: LayerStep, x: Tensor, all_logits: bool = False) -> Tensor:
        """Final norm and head on x [T, D] (logits as in `forward_steps`); the step's cache lengths advance."""
        x = rms_norm(x, self.norm, self.config.rms_norm_eps)
        if not all_logits:
            x = x[step.ctx.last_token]
        logits = F.linear(x, self.lm_head)
        step.advance()
        return logits

    def _moe_output(self, layer: DecoderLayer, h: Tensor, routed: Tensor) -> Tensor:
        if not isinstance(routed, Tensor) or routed.shape != h.shape:
            got = tuple(routed.shape) if isinstance(routed, Tensor) else type(routed).__name__
            raise InputError(
                f"layer {layer.index}: routed output must be a tensor of shape {tuple(h.shape)}, got {got}"
            )
        routed = routed.to(h.dtype)
        if layer.shared is not None:
            return routed + layer.shared(h)
        return routed

    def forward(
        self, batch: Batch, cache: KVCache, experts: Callable[[MoECall], Tensor], all_logits: bool = False
    ) -> Tensor:
        """One step with `experts` answering every MoECall; logits as in `forward_steps`."""
        steps = self.forward_steps(batch, cache, all_logits)
        try:
            call = next(steps)
            while True:
                call = steps.send(experts(call))
        except StopIteration as done:
            logits: Tensor = done.value
            return logits


def _dense(layer: DecoderLayer) -> DenseMLP:
    if layer.dense is None:
        raise InputError(f"layer {layer.index} has neither a router nor a dense MLP")
    return layer.dense
