"""The expert seam: per-expert weights, one expert's forward, grouping tokens by expert, combining.

Pure torch, no I/O. The dense model yields one `MoECall` per MoE layer; whoever answers it (the
in-process `LocalExperts`, or a gating service that sends each group to a remote expert host)
computes `expert_forward(w, hidden[token_idx])` for every group of `group_by_expert` and hands
the outputs to `combine`. Because every path uses these same three functions, greedy output
through the network is bit-identical to the in-process run.

Shape legend: T tokens in the step, D hidden size, I expert intermediate size, K experts per
token (top-k), n tokens routed to one expert.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class MoECall:
    """What one MoE layer asks of its routed experts for one forward step."""

    layer: int  # absolute decoder layer index
    hidden: Tensor  # [T, D] the normed input of the routed experts
    expert_ids: Tensor  # [T, K] int64
    weights: Tensor  # [T, K] router weights, already normalised per family


Groups = list[tuple[int, Tensor, Tensor]]  # (expert, token_idx [n], k_idx [n]) per chosen expert


def group_by_expert(expert_ids: Tensor) -> Groups:
    """Group (token, k) choices by expert.

    expert_ids: [T, K] int64. Returns (expert, token_idx [n], k_idx [n]) per chosen expert,
    ascending by expert; within a group token_idx is ascending. Index tensors are on the device
    of `expert_ids`.
    """
    T, K = expert_ids.shape
    if T == 0:
        return []
    flat = expert_ids.reshape(-1)
    # A stable sort keeps row-major (token, k) order inside each expert: deterministic groups.
    sorted_ids, order = torch.sort(flat, stable=True)
    experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    groups = []
    for expert, idx in zip(experts.tolist(), torch.split(order, counts.tolist()), strict=True):
        groups.append((int(expert), idx // K, idx % K))
    return groups


def combine(call: MoECall, outputs: Mapping[int, Tensor], *, groups: Groups | None = None) -> Tensor:
    """Weighted sum of expert outputs per token: [T, D] in the dtype of `call.hidden`.

    outputs[e] is expert_forward of expert e on hidden[token_idx] for e's group (same order).
    Experts are added in ascending order, each with one index_add_ (no token repeats within a
    group), so the result does not depend on timing or device scheduling. `groups`, if given,
    must be `group_by_expert(call.expert_ids)` (saves computing it twice).
    """
    out = torch.zeros_like(call.hidden)
    for expert, token_idx, k_idx in group_by_expert(call.expert_ids) if groups is None else groups:
        y = outputs.get(expert)
        if y is None:
            raise InputError(f"combine: no output for expert {expert} of layer {call.layer}")
        if y.shape != (token_idx.numel(), out.shape[1]):
            raise InputError(
                f"combine: expert {expert} of layer {call.layer} returned shape {tuple(y.shape)}, "
                f"expected {(token_idx.numel(), out.shape[1])}"
            )
        weighted = y * call.weights[token_idx, k_idx, None]
        out.index_add_(0, token_idx, weighted.to(out.dtype))
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
        outputs: dict[int, Tensor] = {}
        groups = group_by_expert(call.expert_ids)
        for expert, token_idx, _ in groups:
            w = self.weights.get((call.layer, expert))
            if w is None:
                raise InputError(f"expert ({call.layer}, {expert}) is not held by this LocalExperts")
            outputs[expert] = expert_forward(w, call.hidden[token_idx])
        return combine(call, outputs, groups=groups)
