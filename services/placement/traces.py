"""Routing traces: which experts every token chose, per MoE layer, with its node, domain and request.

One trace is one `.npz` file (written by `prism trace`, read by `prism sim`, `prism place` and the bench):

    experts   [T, L, K] int16    chosen experts per token and MoE layer, by descending router weight
    weights   [T, L, K] float16  their router weights
    node      [T] int16          node the token's request arrived at (index into meta.nodes)
    domain    [T] int16          workload domain of the request (index into meta.domains; -1 = unknown)
    request   [T] int32          request id (unique over the trace)
    position  [T] int32          index of the token in its request
    meta      0-d str            JSON: model, moe_layers, num_experts, top_k, hidden_size, domains, nodes,
                                 optional num_shared_experts, bytes_per_element; other keys kept in `extra`

T tokens in arrival order, L MoE layers, K experts per token (top-k), E routed experts per layer,
N nodes, S sampled tokens per node. Pure numpy; nothing here imports nats.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.placement.errors import InvalidInputError
from services.placement.types import CoActivation

ARRAYS: dict[str, tuple[type[np.generic], int]] = {
    # name: (stored dtype, ndim)
    "experts": (np.int16, 3),
    "weights": (np.float16, 3),
    "node": (np.int16, 1),
    "domain": (np.int16, 1),
    "request": (np.int32, 1),
    "position": (np.int32, 1),
}
_META_REQUIRED = ("model", "moe_layers", "num_experts", "top_k", "hidden_size", "domains", "nodes")


class TraceFormatError(InvalidInputError):
    """A routing trace file or array set that breaks the format; the message names the field."""


@dataclass(frozen=True)
class TraceMeta:
    """What a trace's arrays mean: the model's MoE shape and the names behind the indices."""

    model: str
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    hidden_size: int
    domains: tuple[str, ...]
    nodes: tuple[str, ...]
    num_shared_experts: int = 0
    bytes_per_element: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's hidden state in one direction (hidden × dtype bytes)."""
        return self.hidden_size * self.bytes_per_element

    def to_json(self) -> str:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            model=self.model, moe_layers=list(self.moe_layers), num_experts=self.num_experts,
            top_k=self.top_k, hidden_size=self.hidden_size, domains=list(self.domains),
            nodes=list(self.nodes), num_shared_experts=self.num_shared_experts,
            bytes_per_element=self.bytes_per_element,
        )
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TraceMeta:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TraceFormatError(f"trace meta is not valid JSON: {exc}") from exc
        if not isinstance(d, dict):
            raise TraceFormatError(f"trace meta must be a JSON object, got {type(d).__name__}")
        missing = [k for k in _META_REQUIRED if k not in d]
        if missing:
            raise TraceFormatError(f"trace meta lacks {missing}; required keys: {list(_META_REQUIRED)}")
        try:
            meta = cls(
                model=str(d.pop("model")), moe_layers=tuple(int(x) for x in d.pop("moe_layers")),
                num_experts=int(d.pop("num_experts")), top_k=int(d.pop("top_k")),
                hidden_size=int(d.pop("hidden_size")), domains=tuple(str(x) for x in d.pop("domains")),
                nodes=tuple(str(x) for x in d.pop("nodes")),
                num_shared_experts=int(d.pop("num_shared_experts", 0)),
                bytes_per_element=int(d.pop("bytes_per_element", 2)), extra=d,
            )
        except (TypeError, ValueError) as exc:
            raise TraceFormatError(f"trace meta has a field of the wrong type: {exc}") from exc
        meta.check()
        return meta

    def check(self) -> None:
        """Raise TraceFormatError unless the sizes are positive and consistent."""
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise TraceFormatError(
                f"need num_experts >= 1 and 1 <= top_k <= num_experts, got {self.num_experts}, {self.top_k}"
            )
        if not self.moe_layers or self.hidden_size < 1 or self.bytes_per_element < 1:
            raise TraceFormatError("need at least one MoE layer, hidden_size >= 1 and bytes_per_element >= 1")
        if not self.nodes:
            raise TraceFormatError("meta.nodes must name at least one node")


@dataclass(frozen=True, eq=False)
class RoutingTrace:
    """A routing trace in memory; arrays as in the module docstring, checked on construction."""

    experts: np.ndarray
    weights: np.ndarray
    node: np.ndarray
    domain: np.ndarray
    request: np.ndarray
    position: np.ndarray
    meta: TraceMeta

    def __post_init__(self) -> None:
        for name, (dtype, ndim) in ARRAYS.items():
            a = np.asarray(getattr(self, name))
            if a.ndim != ndim:
                raise TraceFormatError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
            if np.issubdtype(dtype, np.integer) and a.size and not np.issubdtype(a.dtype, np.integer):
                raise TraceFormatError(f"{name} must hold integers, got dtype {a.dtype}")
            object.__setattr__(self, name, np.ascontiguousarray(a, dtype=dtype))
        self.meta.check()
        _check_arrays(self)

    # ---- sizes
    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def num_experts(self) -> int:
        return self.meta.num_experts

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def num_nodes(self) -> int:
        return len(self.meta.nodes)

    # ---- file I/O
    def save(self, path: str | Path) -> Path:
        """Write the trace as one compressed .npz (no pickle); returns the path written (numpy adds
        `.npz` to a name without it)."""
        out = Path(path)
        out = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")
        arrays = {name: getattr(self, name) for name in ARRAYS}
        np.savez_compressed(out, meta=np.array(self.meta.to_json()), **arrays)
        return out

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        """Read and validate a trace; raises TraceFormatError with the reason when it is not one."""
        p = Path(path)
        try:
            with np.load(p, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except FileNotFoundError as exc:
            raise TraceFormatError(f"no trace file at {p}") from exc
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise TraceFormatError(f"{p} is not a readable .npz trace: {exc}") from exc
        missing = [k for k in (*ARRAYS, "meta") if k not in data]
        if missing:
            raise TraceFormatError(f"{p} lacks arrays {missing}; a trace holds {[*ARRAYS, 'meta']}")
        meta_arr = data.pop("meta")
        if meta_arr.ndim != 0 or meta_arr.dtype.kind != "U":
            raise TraceFormatError(f"meta must be a 0-d str array holding JSON, got {meta_arr.dtype} {meta_arr.shape}")
        meta = TraceMeta.from_json(str(meta_arr))
        return cls(meta=meta, **{k: data[k] for k in ARRAYS})

    # ---- views
    def select(self, mask: np.ndarray) -> RoutingTrace:
        """The tokens where mask [T] bool is true, in order, same meta."""
        m = np.asarray(mask, dtype=bool)
        return RoutingTrace(meta=self.meta, **{k: getattr(self, k)[m] for k in ARRAYS})

    def counts(self, num_nodes: int | None = None) -> np.ndarray:
        """f [N, L, E] float64: how often each node's tokens chose each (layer, expert)."""
        n = self.num_nodes if num_nodes is None else num_nodes
        if n < self.num_nodes and self.num_tokens and int(self.node.max()) >= n:
            raise TraceFormatError(f"trace has tokens of node {int(self.node.max())} but num_nodes is {n}")
        return node_layer_counts(self.experts, self.node, n, self.num_experts)

    def token_counts(self, num_nodes: int | None = None) -> np.ndarray:
        """[N, L] float64: tokens per node and layer (every token passes every MoE layer)."""
        n = self.num_nodes if num_nodes is None else num_nodes
        per_node = np.bincount(self.node, minlength=n)[:n].astype(np.float64)
        return np.repeat(per_node[:, None], self.num_layers, axis=1)

    def coactivation(self, num_nodes: int | None = None, samples_per_node: int = 128) -> CoActivation:
        """The co-activation sample the `latency` policy needs (top-k sets of S tokens per node)."""
        n = self.num_nodes if num_nodes is None else num_nodes
        return CoActivation.from_topk(self.experts, self.node, n, samples_per_node)

    def pair_counts(self, num_nodes: int | None = None) -> np.ndarray:
        """[N, L, E, E] float64: tokens of node n whose layer-l top-k holds both e and e'.

        Symmetric; the diagonal equals `counts`. Memory N·L·E² — fine for E <= 64, not for E = 256.
        """
        n = self.num_nodes if num_nodes is None else num_nodes
        e, k = self.num_experts, self.top_k
        out = np.zeros(n * self.num_layers * e * e)
        base = (self.node.astype(np.int64)[:, None] * self.num_layers + np.arange(self.num_layers)) * e * e
        ex = self.experts.astype(np.int64)
        for i in range(k):
            for j in range(k):
                idx = base + ex[:, :, i] * e + ex[:, :, j]
                out += np.bincount(idx.ravel(), minlength=out.size)
        return out.reshape(n, self.num_layers, e, e)


def node_layer_counts(experts: np.ndarray, node: np.ndarray, num_nodes: int, num_experts: int) -> np.ndarray:
    """f [N, L, E] float64 from experts [T, L, K] and node [T] (one bincount, no Python loop)."""
    _, num_layers, _ = experts.shape
    flat = (node.astype(np.int64)[:, None, None] * num_layers + np.arange(num_layers)[None, :, None]) * num_experts
    flat = flat + experts.astype(np.int64)
    size = num_nodes * num_layers * num_experts
    counts = np.bincount(flat.ravel(), minlength=size)[:size].astype(np.float64)
    return counts.reshape(num_nodes, num_layers, num_experts)


def _check_arrays(t: RoutingTrace) -> None:
    """Shapes agree with each other and with meta; then the values (see _check_values)."""
    T = t.experts.shape[0]
    meta = t.meta
    if t.experts.shape[1:] != (len(meta.moe_layers), meta.top_k):
        raise TraceFormatError(
            f"experts has shape {t.experts.shape}, but meta says {len(meta.moe_layers)} MoE layers "
            f"and top_k {meta.top_k}"
        )
    if t.weights.shape != t.experts.shape:
        raise TraceFormatError(f"weights has shape {t.weights.shape}, expected {t.experts.shape}")
    for name in ("node", "domain", "request", "position"):
        if getattr(t, name).shape != (T,):
            raise TraceFormatError(f"{name} must have shape [{T}], got {getattr(t, name).shape}")
    if T:
        _check_values(t)


def _check_values(t: RoutingTrace) -> None:
    """Indices in range, no expert twice in one token's top-k, weights finite, one node per request."""
    meta = t.meta
    lo, hi = int(t.experts.min()), int(t.experts.max())
    if lo < 0 or hi >= meta.num_experts:
        raise TraceFormatError(f"experts must lie in [0, {meta.num_experts}), found {lo}..{hi}")
    s = np.sort(t.experts, axis=-1)
    if np.any(s[..., 1:] == s[..., :-1]):
        raise TraceFormatError("a token chose the same expert twice in one layer's top-k")
    if not np.all(np.isfinite(t.weights)):
        raise TraceFormatError("weights contain NaN or infinity")
    lo, hi = int(t.node.min()), int(t.node.max())
    if lo < 0 or hi >= len(meta.nodes):
        raise TraceFormatError(f"node must lie in [0, {len(meta.nodes)}) (meta.nodes), found {lo}..{hi}")
    if t.domain.min() < -1 or t.domain.max() >= len(meta.domains):
        raise TraceFormatError(f"domain must lie in [-1, {len(meta.domains)}) (-1 = unknown), found {t.domain.max()}")
    if t.position.min() < 0 or t.request.min() < 0:
        raise TraceFormatError("request and position must be >= 0")
    order = np.argsort(t.request, kind="stable")
    same = t.request[order][1:] == t.request[order][:-1]
    if np.any(same & (t.node[order][1:] != t.node[order][:-1])):
        raise TraceFormatError("all tokens of one request must belong to one node")
