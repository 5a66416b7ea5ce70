"""The expert seam: per-expert weights, one expert's forward, routing tokens to experts, combining.

Pure torch, no I/O. The dense model yields one `MoECall` per MoE layer; whoever answers it (the
in-process `LocalExperts`, or a gating service that sends the rows to remote expert hosts) builds a
`Routing`, computes `expert_forward(w, rows)` on each expert's contiguous block of
`routing.rows(hidden)` and hands the outputs to `combine`. Because every path uses these same
functions, greedy output through the network is bit-identical to the in-process run.

Shape legend: T tokens in the step, D hidden size, I expert intermediate size, K experts per
token (top-k), n tokens routed to one expert.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.model.errors import InputError

# Fresh torch allocations are aligned to 64 bytes. Some CPU BLAS kernels give different last bits
# for small batches when an operand is not 16-byte aligned (measured: [n<=3, D] inputs), so every
# operand of an expert is made an aligned, compact tensor first: same values, same bits, wherever
# the tensor came from (a zero-copy network decode, a slice of a fused checkpoint tensor).
_ALIGN = 64


def aligned(t: Tensor, compact: bool = True) -> Tensor:
    """`t` itself if it is contiguous, 64-byte aligned and (when `compact`) owns its whole
    storage; else a compact copy. (`compact` keeps a view from pinning a bigger buffer.)"""
    if t.is_contiguous() and t.data_ptr() % _ALIGN == 0 and (
        not compact or t.untyped_storage().nbytes() == t.numel() * t.element_size()
    ):
        return t
    return t.clone(memory_format=torch.contiguous_format)


@dataclass(frozen=True)
class ExpertWeights:
    """One routed expert: down(silu(gate x) * up x). Held per expert so it can be moved alone.

    `gate` and `up` are views of one aligned `gate_up` buffer [2I, D] (built on construction, no
    extra memory): the expert runs one [n, D] x [D, 2I] matmul for both, as transformers does, so
    logits match it bit for bit where the computation order allows. `down` is stored aligned too.
    """

    gate: Tensor  # [I, D]
    up: Tensor  # [I, D]
    down: Tensor  # [D, I]
    gate_up: Tensor = field(init=False, repr=False, compare=False)  # [2I, D]; gate = [:I], up = [I:]

    def __post_init__(self) -> None:
        gate, up, down = self.gate, self.up, self.down
        if gate.dim() != 2 or up.shape != gate.shape or down.shape != (gate.shape[1], gate.shape[0]):
            raise InputError(
                f"expert weights need gate [I, D], up [I, D], down [D, I]; got {list(gate.shape)}, "
                f"{list(up.shape)}, {list(down.shape)}"
            )
        gate_up = _fused_base(gate, up)
        if gate_up is None:
            gate_up = torch.cat([gate, up.to(device=gate.device, dtype=gate.dtype)])
        inner = gate.shape[0]
        object.__setattr__(self, "gate_up", gate_up)
        object.__setattr__(self, "gate", gate_up[:inner])
        object.__setattr__(self, "up", gate_up[inner:])
        object.__setattr__(self, "down", aligned(down))

    @classmethod
    def from_gate_up(cls, gate_up: Tensor, down: Tensor) -> ExpertWeights:
        """From transformers' fused layout: gate_up [2I, D] (gate first), down [D, I]."""
        inner = gate_up.shape[0] // 2
        base = aligned(gate_up)
        return cls(base[:inner], base[inner:], down)

    def nbytes(self) -> int:
        """Bytes held by the three matrices."""
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.down))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ExpertWeights:
        """A copy on `device` in `dtype` (either may be None to keep it)."""
        return ExpertWeights.from_gate_up(
            self.gate_up.to(device=device, dtype=dtype), self.down.to(device=device, dtype=dtype)
        )


def _fused_base(gate: Tensor, up: Tensor) -> Tensor | None:
    """The aligned [2I, D] tensor whose two halves are `gate` and `up`, if there is one."""
    base = gate._base
    if base is None or up._base is not base or base.dim() != 2 or base.shape[0] != 2 * gate.shape[0]:
        return None
    if gate.data_ptr() != base.data_ptr() or up.data_ptr() != base.data_ptr() + gate.numel() * gate.element_size():
        return None
    return base if aligned(base) is base else None


def expert_forward(w: ExpertWeights, x: Tensor) -> Tensor:
    """Apply one SwiGLU expert: [n, D] -> [n, D] (same dtype as the weights)."""
    gate, up = F.linear(aligned(x, compact=False), w.gate_up).chunk(2, dim=-1)  # [n, I] each
    return F.linear(F.silu(gate) * up, w.down)


def run_experts(weights: list[ExpertWeights], rows: Tensor, counts: list[int]) -> Tensor:
    """Each expert on its rows of an expert-sorted block (`counts[i]` rows of `weights[i]` in turn): the
    outputs [N, D] in the same order."""
    if len(weights) == 1:
        return expert_forward(weights[0], rows)
    return torch.cat([expert_forward(w, part) for w, part in zip(weights, torch.split(rows, counts), strict=True)])


@dataclass(frozen=True)
class MoECall:
    """What one MoE layer asks of its routed experts for one forward step."""

    layer: int  # absolute decoder layer index
    hidden: Tensor  # [T, D] the normed input of the routed experts
    expert_ids: Tensor  # [T, K] int64
    weights: Tensor  # [T, K] router weights, already normalised per family


SMALL_CALL = 64
"""Up to this many (token, k) choices a call is sorted in plain Python (`Routing._of_few`)."""


@dataclass(frozen=True)
class Routing:
    """One MoE call's (token, k) choices sorted by expert: the rows each expert must see, as one block.

    Row r of the block is `hidden[token_idx[r]]`; rows of one expert are contiguous (`counts`, in the
    order of `experts`, ascending) and, within an expert, in ascending token order. Built with a few
    whole-tensor operations, whatever the number of experts, so dispatch cost does not grow with it.
    """

    experts: list[int]  # chosen experts, ascending
    counts: list[int]  # rows per expert; N = sum(counts)
    order: Tensor  # [N] flat choice index (token * K + k) of each row
    token_idx: Tensor  # [N] token of each row

    @classmethod
    def of(cls, expert_ids: Tensor, live: Tensor | None = None) -> Routing:
        """expert_ids [T, K] int64; `live` [T] bool leaves the other tokens' choices out."""
        K = expert_ids.shape[1]
        if live is None and expert_ids.numel() <= SMALL_CALL:
            return cls._of_few(expert_ids.reshape(-1).tolist(), K, expert_ids.device)
        choices = expert_ids.reshape(-1)
        order = torch.arange(choices.numel(), device=expert_ids.device)
        if live is not None and not bool(live.all()):
            order = order[live.repeat_interleave(K)]
            choices = choices[order]
        # A stable sort keeps row-major (token, k) order inside each expert: deterministic blocks.
        sorted_ids, perm = torch.sort(choices, stable=True)
        experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        order = order[perm]
        return cls(experts.tolist(), counts.tolist(), order, torch.div(order, K, rounding_mode="floor"))

    @classmethod
    def _of_few(cls, choices: list[int], k: int, device: torch.device) -> Routing:
        """`of` for a decode step's few choices, in plain Python: the same block, from two tensor ops
        instead of eight (each costs microseconds, more than sorting a dozen ints)."""
        order = sorted(range(len(choices)), key=choices.__getitem__)  # stable, like the tensor path
        experts: list[int] = []
        counts: list[int] = []
        for i in order:
            if experts and experts[-1] == choices[i]:
                counts[-1] += 1
            else:
                experts.append(choices[i])
                counts.append(1)
        token_idx = [i // k for i in order]
        long = torch.long
        return cls(experts, counts, torch.tensor(order, dtype=long, device=device),
                   torch.tensor(token_idx, dtype=long, device=device))

    def rows(self, hidden: Tensor) -> Tensor:
        """[N, D]: each expert's input rows, contiguous per expert."""
        return hidden[self.token_idx]

    @functools.cached_property
    def spans(self) -> dict[int, tuple[int, int]]:
        """expert → (first row, end row) of its rows in the block, experts ascending."""
        ends = itertools.accumulate(self.counts)
        return {e: (end - n, end) for e, n, end in zip(self.experts, self.counts, ends, strict=True)}


def combine(call: MoECall, routing: Routing, outputs: Tensor) -> Tensor:
    """Weighted sum of expert outputs per token: [T, D] in the dtype of `call.hidden`.

    outputs [N, D] are the experts' answers to `routing.rows(call.hidden)`, row for row. Each token's
    K contributions are added in ascending expert order, starting from zero — the arithmetic of one
    index_add_ per expert in expert order (transformers' loop), so the bits do not depend on how the
    rows were computed or on timing. Tokens left out of `routing` get zeros.
    """
    T, K = call.expert_ids.shape
    D = call.hidden.shape[1]
    if outputs.shape != (routing.order.numel(), D):
        raise InputError(
            f"combine: layer {call.layer} got expert outputs of shape {tuple(outputs.shape)}, "
            f"expected {(routing.order.numel(), D)}"
        )
    per_choice = outputs.new_zeros(T * K, D).index_copy_(0, routing.order, outputs).view(T, K, D)
    weighted = (per_choice * call.weights[..., None]).to(call.hidden.dtype)
    if K > 2:  # each token's choices in ascending expert order (with two, addition commutes exactly)
        rank = call.expert_ids.argsort(dim=1, stable=True)
        weighted = weighted.gather(1, rank[..., None].expand(T, K, D))
    out = weighted[:, 0].clone()  # = 0 + first
    for k in range(1, K):
        out += weighted[:, k]
    return out


class LocalExperts:
    """Routed experts held in this process, per (layer, expert); answers MoECalls in-process."""

    def __init__(self, weights: Mapping[tuple[int, int], ExpertWeights]) -> None:
        self.weights: dict[tuple[int, int], ExpertWeights] = dict(weights)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        keys: Iterable[tuple[int, int]] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> LocalExperts:
        """Load the experts `keys` ((layer, expert) pairs; None = all) from a checkpoint dir."""
        from shared.model.checkpoint import load_experts

        return cls(load_experts(path, keys, dtype=dtype, device=device))

    def nbytes(self) -> int:
        """Bytes held by all resident experts."""
        return sum(w.nbytes() for w in self.weights.values())

    def __call__(self, call: MoECall) -> Tensor:
        """Run every chosen expert on its tokens and combine: [T, D]."""
        routing = Routing.of(call.expert_ids)
        rows = routing.rows(call.hidden)
        try:
            weights = [self.weights[(call.layer, e)] for e in routing.experts]
        except KeyError as missing:
            raise InputError(f"expert {missing.args[0]} is not held by this LocalExperts") from None
        return combine(call, routing, run_experts(weights, rows, routing.counts) if weights else torch.zeros_like(rows))
