"""Activation statistics for placement: sliding windows of counts per (node, layer, expert), a sample of
top-k sets for co-activation, and workload-shift detection. Pure numpy; nothing here imports nats.

Each node's tokens are cut into chunks of about `chunk_tokens` tokens: token by token in the simulator
(`add_tokens`); in the service a gating's activation report is added whole (`add_counts`), so a
report of at least `chunk_tokens` tokens is one chunk and the windows below count reports. The window
is the last `window_chunks` chunks (a sliding window). After every chunk, the last `short_chunks` chunks (short
window) are compared with the earlier chunks of the window (reference) by total variation, mean over
layers. Sampling noise alone makes that distance ≈ sqrt(2/π)·½·Σ_e sqrt(p_e(1-p_e)(1/n_s + 1/n_r))
(n = expert selections); a shift is declared when the distance exceeds `noise_factor` times that plus
`floor`. On a shift the window is cut at the most likely change point (binary segmentation over the
recent chunks), so the counts describe the new workload at once rather than after the old one ages
out of the window — one migration instead of three.

Shape legend: N nodes, L MoE layers, E experts, K top-k, C chunks, S sampled tokens per node.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from services.placement.errors import InvalidInputError
from services.placement.types import CoActivation

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class StatsConfig:
    """Window and detector settings; all counts in tokens of one node."""

    chunk_tokens: int = 64          # tokens per chunk (the detector runs once per chunk)
    window_chunks: int = 64         # sliding window: 64 × 64 = 4096 tokens per node
    short_chunks: int = 4           # short window: the last 256 tokens
    min_reference_chunks: int = 8   # at least 512 earlier tokens before a shift can be declared
    noise_factor: float = 3.0       # distance / expected sampling noise that counts as a shift
    floor: float = 0.02             # plus this much total variation
    samples_per_node: int = 128     # co-activation sample: top-k sets of this many recent tokens
    sample_every: int = 4           # keep every 4th token's set (spread over requests)

    def __post_init__(self) -> None:
        if min(self.chunk_tokens, self.short_chunks, self.min_reference_chunks, self.samples_per_node,
               self.sample_every) < 1:
            raise InvalidInputError("StatsConfig sizes must be >= 1")
        if self.window_chunks < self.short_chunks + self.min_reference_chunks:
            raise InvalidInputError("window_chunks must be >= short_chunks + min_reference_chunks")
        if self.noise_factor <= 0 or self.floor < 0:
            raise InvalidInputError("noise_factor must be > 0 and floor >= 0")


@dataclass(frozen=True)
class ShiftEvent:
    """A detected workload shift at `node`, after `at_token` of its tokens; the window restarts at
    `cut_token` (the estimated change point). `distance` is the short-vs-reference total variation."""

    node: int
    at_token: int
    cut_token: int
    distance: float
    threshold: float


class _NodeWindow:
    """One node's chunks, the open chunk, and its sample of top-k sets."""

    def __init__(self, num_layers: int, num_experts: int, cfg: StatsConfig) -> None:
        self.cfg = cfg
        self.chunks: deque[tuple[int, int, np.ndarray]] = deque()    # (first token, tokens, counts [L, E])
        self.open = np.zeros((num_layers, num_experts))
        self.open_tokens = 0
        self.tokens = 0                                              # tokens seen by this node
        self.samples: deque[tuple[int, np.ndarray]] = deque(maxlen=cfg.samples_per_node)  # (token, [L, K])

    def total(self) -> np.ndarray:
        """[L, E] counts of the window (closed chunks plus the open one)."""
        out = self.open.copy()
        for _, _, c in self.chunks:
            out += c
        return out

    def add(self, counts: np.ndarray, tokens: int) -> bool:
        """Add counts [L, E] of `tokens` tokens; True when a chunk closed (the detector should run)."""
        self.open += counts
        self.open_tokens += tokens
        self.tokens += tokens
        if self.open_tokens < self.cfg.chunk_tokens:
            return False
        self.chunks.append((self.tokens - self.open_tokens, self.open_tokens, self.open))
        self.open = np.zeros_like(self.open)
        self.open_tokens = 0
        while len(self.chunks) > self.cfg.window_chunks:
            self.chunks.popleft()
        return True

    def cut(self, index: int) -> int:
        """Drop chunks before chunk `index` (and samples older than it); return the first kept token."""
        first = self.chunks[index][0]
        for _ in range(index):
            self.chunks.popleft()
        while self.samples and self.samples[0][0] < first:
            self.samples.popleft()
        return first


def _tv_and_noise(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Total variation between the distributions of counts a, b [L, E] (mean over layers), and what
    sampling noise alone would give for samples that size."""
    na, nb = a.sum(-1, keepdims=True), b.sum(-1, keepdims=True)
    pa, pb = a / np.maximum(na, 1), b / np.maximum(nb, 1)
    tv = float(0.5 * np.abs(pa - pb).sum(-1).mean())
    p = (a + b) / np.maximum(na + nb, 1)
    spread = np.sqrt(p * (1 - p) * (1 / np.maximum(na, 1) + 1 / np.maximum(nb, 1)))
    return tv, float(0.5 * _SQRT_2_OVER_PI * spread.sum(-1).mean())


class RoutingStats:
    """Windowed activation counts and a co-activation sample per node, with shift detection."""

    def __init__(self, num_nodes: int, num_layers: int, num_experts: int, top_k: int,
                 config: StatsConfig | None = None) -> None:
        if min(num_nodes, num_layers, num_experts, top_k) < 1 or top_k > num_experts:
            raise InvalidInputError("need nodes, layers, experts >= 1 and 1 <= top_k <= experts")
        self.cfg = config or StatsConfig()
        self.shape = (num_nodes, num_layers, num_experts)
        self.top_k = top_k
        self.nodes = [_NodeWindow(num_layers, num_experts, self.cfg) for _ in range(num_nodes)]
        self.events: deque[ShiftEvent] = deque(maxlen=1000)  # the latest shifts (a service runs for months)

    def add_tokens(self, node: int, experts: np.ndarray) -> ShiftEvent | None:
        """Add the routing of `node`'s tokens, experts [T, L, K] in arrival order; a ShiftEvent if one
        was detected (the window has already been cut)."""
        x = np.asarray(experts)
        _, L, E = self.shape
        if x.ndim != 3 or x.shape[1:] != (L, self.top_k):
            raise InvalidInputError(f"experts must be [tokens, {L}, {self.top_k}], got {x.shape}")
        w = self._node(node)
        every = self.cfg.sample_every
        for i in range(-w.tokens % every, x.shape[0], every):
            w.samples.append((w.tokens + i, x[i].astype(np.int32)))
        counts = np.zeros((L, E))
        np.add.at(counts, (np.arange(L)[None, :, None], x), 1.0)
        return self.add_counts(node, counts, x.shape[0])

    def add_counts(self, node: int, counts: np.ndarray, tokens: int) -> ShiftEvent | None:
        """Add counts [L, E] of `tokens` tokens of `node` (what a gating publishes); a ShiftEvent if one
        was detected."""
        c = np.asarray(counts, dtype=np.float64)
        if c.shape != self.shape[1:] or np.any(c < 0) or not np.all(np.isfinite(c)) or tokens < 0:
            raise InvalidInputError(f"counts must be finite, >= 0, shape {self.shape[1:]}; tokens >= 0")
        w = self._node(node)
        if not w.add(c, tokens):
            return None
        event = self._detect(node, w)
        if event is not None:
            self.events.append(event)
        return event

    def counts(self) -> np.ndarray:
        """f [N, L, E]: each node's counts over its current window."""
        return np.stack([w.total() for w in self.nodes])

    def window_tokens(self) -> np.ndarray:
        """[N] tokens in each node's current window."""
        return np.array([w.open_tokens + sum(t for _, t, _ in w.chunks) for w in self.nodes])

    def coactivation(self) -> CoActivation:
        """The sampled top-k sets of each node's window, as the `latency` policy takes them."""
        N, L, _ = self.shape
        S = self.cfg.samples_per_node
        sets = np.full((N, S, L, self.top_k), -1, dtype=np.int32)
        for n, w in enumerate(self.nodes):
            for i, (_, s) in enumerate(w.samples):
                sets[n, i] = s
        tokens = np.repeat(self.window_tokens()[:, None].astype(np.float64), L, axis=1)
        return CoActivation(tokens=tokens, sets=sets)

    def _node(self, node: int) -> _NodeWindow:
        if not 0 <= node < self.shape[0]:
            raise InvalidInputError(f"node must lie in [0, {self.shape[0]}), got {node}")
        return self.nodes[node]

    def _detect(self, node: int, w: _NodeWindow) -> ShiftEvent | None:
        cfg = self.cfg
        chunks = [c for _, _, c in w.chunks]
        if len(chunks) < cfg.short_chunks + cfg.min_reference_chunks:
            return None
        short = np.sum(chunks[-cfg.short_chunks:], axis=0)
        ref = np.sum(chunks[: -cfg.short_chunks], axis=0)
        tv, noise = _tv_and_noise(short, ref)
        threshold = cfg.noise_factor * noise + cfg.floor
        if tv <= threshold:
            return None
        cut_token = w.cut(_change_point(chunks, cfg.short_chunks))
        return ShiftEvent(node=node, at_token=w.tokens, cut_token=cut_token, distance=tv, threshold=threshold)


def _change_point(chunks: list[np.ndarray], short: int) -> int:
    """Index of the first chunk of the new workload: the split of the last 2·short chunks that best
    separates before from after (total variation weighted by sqrt of the harmonic sample size)."""
    n = len(chunks)
    best, best_score = n - short, -1.0
    for j in range(max(1, n - 2 * short), n):
        a, b = np.sum(chunks[:j], axis=0), np.sum(chunks[j:], axis=0)
        na, nb = a.sum(), b.sum()
        tv, _ = _tv_and_noise(a, b)
        score = tv * math.sqrt(na * nb / max(na + nb, 1.0))
        if score > best_score:
            best, best_score = j, score
    return best
