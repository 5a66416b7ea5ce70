"""Activation reports: how many tokens each node sent to each (layer, expert) over a window, and the
load its own requests put on it (steps, sequences, dense compute, requests finished).

Published by every gating on `prism.v1.activations.<node>`, read by the placement service.
msgpack on the wire: {"v", "node", "window_s", "layers", "num_experts", "counts": LE bytes of shape
[len(layers), num_experts], "count_dtype": the smallest of `COUNT_DTYPES` that holds the largest count
(absent: "<i8", as gatings before it wrote), "tokens": int64 LE tokens per layer, "steps",
"step_sequences", "dense_s", "dense_layers", "finished"} (the last five: `StepLoad`; a report without
them has none). The counts are most of a report, and most of them small: one byte each where a window's
counts stay below 256 (DeepSeek-V3's 58 × 256 counts: 15 kB a report instead of 119), so that a report
holds up the data messages behind it on a node's link for an eighth of the time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import msgpack
import numpy as np
import numpy.typing as npt

from shared.errors import BadTensor

COUNT_DTYPES = ("<u1", "<u2", "<u4", "<i8")


@dataclass
class StepLoad:
    """The forward steps a gating ran for its own requests over a window: how many, the sequences in
    them (a decode step's batch; a prefill counts its sequence once), the seconds of dense compute
    (embedding, attention, routers, head) over the MoE layers they ran here, and the requests that
    finished. The placement service turns them into batch sizes, step rates, the dense time of a layer
    and the steps a request takes (services/placement/load.py)."""

    steps: int = 0
    sequences: int = 0
    dense_s: float = 0.0
    dense_layers: int = 0
    finished: int = 0

    def add(self, sequences: int, dense_s: float, layers: int) -> None:
        self.steps += 1
        self.sequences += sequences
        self.dense_s += dense_s
        self.dense_layers += layers

    def take(self) -> StepLoad:
        """The window so far; starts a new one."""
        taken = replace(self)
        for f in fields(self):
            setattr(self, f.name, f.default)
        return taken


@dataclass(frozen=True)
class ActivationReport:
    node: str
    window_s: float
    layers: list[int]  # absolute indices of the MoE layers, one row of `counts` each
    counts: npt.NDArray[np.int64]  # [len(layers), E] tokens routed to each expert in the window
    tokens: npt.NDArray[np.int64]  # [len(layers)] tokens that went through each layer's router
    load: StepLoad = field(default_factory=StepLoad)

    def encode(self) -> bytes:
        dtype = count_dtype(self.counts)
        return msgpack.packb(
            {
                "v": 1,
                "node": self.node,
                "window_s": self.window_s,
                "layers": self.layers,
                "num_experts": int(self.counts.shape[1]),
                "counts": self.counts.astype(dtype).tobytes(),
                "count_dtype": dtype,
                "tokens": self.tokens.astype("<i8").tobytes(),
                "steps": self.load.steps,
                "step_sequences": self.load.sequences,
                "dense_s": self.load.dense_s,
                "dense_layers": self.load.dense_layers,
                "finished": self.load.finished,
            }
        )

    @classmethod
    def decode(cls, payload: bytes) -> ActivationReport:
        try:
            data = msgpack.unpackb(payload)
            layers = [int(x) for x in data["layers"]]
            dtype = data.get("count_dtype", "<i8")
            if dtype not in COUNT_DTYPES:
                raise ValueError(f"count_dtype {dtype!r} is not one of {COUNT_DTYPES}")
            counts = np.frombuffer(data["counts"], dtype=dtype).reshape(len(layers), int(data["num_experts"]))
            tokens = np.frombuffer(data["tokens"], dtype="<i8").reshape(len(layers))
            load = StepLoad(int(data.get("steps", 0)), int(data.get("step_sequences", 0)),
                            float(data.get("dense_s", 0.0)), int(data.get("dense_layers", 0)),
                            int(data.get("finished", 0)))
            if counts.size and counts.min() < 0:
                raise ValueError("negative counts")
            if (min(load.steps, load.sequences, load.dense_layers, load.finished) < 0
                    or not 0.0 <= load.dense_s < float("inf")):
                raise ValueError("negative or non-finite load")
            return cls(str(data["node"]), float(data["window_s"]), layers, counts.astype(np.int64), tokens.copy(), load)
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
            raise BadTensor(f"not an activation report: {exc}") from None


def count_dtype(counts: npt.NDArray[np.int64]) -> str:
    """The smallest of `COUNT_DTYPES` that holds every count (all >= 0)."""
    if counts.size and counts.min() < 0:
        return COUNT_DTYPES[-1]
    largest = int(counts.max()) if counts.size else 0
    for dtype in COUNT_DTYPES[:-1]:
        if largest <= np.iinfo(dtype).max:
            return dtype
    return COUNT_DTYPES[-1]


class ActivationCounter:
    """Accumulates counts between reports (owned by one gating)."""

    def __init__(self, node: str, layers: list[int], num_experts: int) -> None:
        self.node = node
        self.layers = layers
        self.num_experts = num_experts
        self.row = {layer: i for i, layer in enumerate(layers)}
        # Python ints, not numpy: `add` runs on every MoE layer of every step, and a numpy scalar
        # update costs about ten times a list's.
        self.counts = [[0] * num_experts for _ in layers]
        self.tokens = [0] * len(layers)

    def add(self, layer: int, experts: list[int], counts: list[int], *, tokens: int) -> None:
        """`counts[i]` tokens of one MoE call chose `experts[i]` (distinct); `tokens` went through the router."""
        i = self.row[layer]
        row = self.counts[i]
        for expert, count in zip(experts, counts, strict=True):
            row[expert] += count
        self.tokens[i] += tokens

    def take(self, window_s: float, load: StepLoad | None = None) -> ActivationReport:
        """The report of the window so far (with `load`, the gating's steps over it); starts a new window."""
        counts = np.array(self.counts, dtype=np.int64).reshape(len(self.layers), self.num_experts)
        report = ActivationReport(self.node, window_s, self.layers, counts, np.array(self.tokens, dtype=np.int64),
                                  load or StepLoad())
        self.counts = [[0] * self.num_experts for _ in self.layers]
        self.tokens = [0] * len(self.layers)
        return report
