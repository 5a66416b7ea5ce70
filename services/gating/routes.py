"""Routes: which node executes each layer of a home node's requests (README, "Routes").

A route is a tuple of node names, one per decoder layer; stay-home is `(home,) * L`, a pipeline split
gives contiguous ranges to several nodes. Consecutive layers on one node form a `Segment` (exo's shard:
start, end, node). The home runs its own segments; a *chain* is a maximal run of segments on other
nodes: the step's hidden states hop one way along it, each node runs its layers (attention on the KV it
keeps for the request, its MoE calls from where it stands), and the chain's last node answers the home,
which goes on with its next segment and at the end applies the final norm and head.

Pure: no NATS here. `route_steps` is the model's step as a generator that yields a `MoECall` per MoE
layer the home runs and a `Hop` per chain; the engine answers both.

Shape legend: T tokens in the step, D hidden size, L layers.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

from torch import Tensor

from shared import subjects
from shared.model.cache import KVCache
from shared.model.model import Batch, MoEModel
from shared.model.moe import MoECall

Route = tuple[str, ...]
"""Executing node of each layer, for one home node's requests."""


@dataclass(frozen=True)
class Segment:
    """Layers `start .. end - 1`, executed on `node`."""

    start: int
    end: int
    node: str

    def as_list(self) -> list[int | str]:
        return [self.start, self.end, self.node]


@dataclass(frozen=True)
class Hop:
    """Hidden states x [T, D] to run through `chain` (segments on other nodes, in order); the engine
    answers with x after the chain's last layer. `counts` / `lens` per sequence of the step: new tokens,
    and tokens cached before the step (the executing nodes check their KV against it)."""

    chain: tuple[Segment, ...]
    hidden: Tensor
    counts: list[int]
    lens: list[int]


def check_route(route: Sequence[str], num_layers: int) -> Route:
    """`route` as a Route; ValueError unless it names a valid node for each of the model's layers."""
    if len(route) != num_layers:
        raise ValueError(f"a route names the executing node of each of the {num_layers} layers, got {len(route)}")
    for node in route:
        subjects.check_token(node, "node")
    return tuple(route)


def segments(route: Route) -> list[Segment]:
    """The route's maximal runs of layers on one node, in layer order."""
    out: list[Segment] = []
    for layer, node in enumerate(route):
        if out and out[-1].node == node:
            out[-1] = Segment(out[-1].start, layer + 1, node)
        else:
            out.append(Segment(layer, layer + 1, node))
    return out


def chains(route: Route, home: str) -> list[Segment | tuple[Segment, ...]]:
    """The home's own segments, and between them the chains of other nodes' segments."""
    out: list[Segment | tuple[Segment, ...]] = []
    for seg in segments(route):
        if seg.node == home:
            out.append(seg)
        elif out and isinstance(out[-1], tuple):
            out[-1] = (*out[-1], seg)
        else:
            out.append((seg,))
    return out


def route_steps(
    model: MoEModel, batch: Batch, cache: KVCache, route: Route, home: str
) -> Generator[MoECall | Hop, Tensor, Tensor]:
    """One step along `route`: yields a MoECall per MoE layer the home runs (send back the combined
    routed output [T, D]) and a Hop per chain (send back x [T, D] after it); returns logits [B, V]."""
    step = model.begin_step(batch, cache)
    x = step.embed(model.embed)
    for part in chains(route, home):
        if isinstance(part, Segment):
            x = yield from model.layer_steps(step, x, part.start, part.end)
        else:
            x = yield Hop(part, x, step.ctx.counts, step.ctx.lens_before)
    return model.end_step(step, x)


def foreign_nodes(route: Route | None, home: str) -> set[str]:
    """The nodes other than the home that keep KV for a request on `route`."""
    return set(route or ()) - {home}
