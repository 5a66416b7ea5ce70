"""Routing statistics computed from any routing trace, and the ranges measured on real MoE models
(the team's FACTS.md, outside this repository; its numbers are FACTS_RANGES below).

Definitions (u[d, l, e] = share of domain d's layer-l selections that went to expert e):

    entropy            H(u[d, l]) / log E, mean over layers, per domain
    busiest_over_mean  max_e u[d, l, e] · E, mean over layers, per domain (and its max over d, l)
    top25_share        share of the top ⌈E/4⌉ experts, mean over layers, per domain
    domain_tv          ½ Σ_e |u[a, l, e] − u[b, l, e]|, mean over layers, per pair of domains
    cache_own/other    a ⌈E/4⌉-expert cache per layer chosen from the first half of domain A's requests:
                       hit rate on A's second half / on every other domain's tokens (mean over pairs)
    top1_repeat        P(adjacent tokens of one request have the same top-1 expert), uniform chance 1/E
    reuse_vs_chance    mean |S_t ∩ S_t+1| of adjacent tokens over the uniform chance K²/E
    next_layer_top20   for e chosen at layer l, the share of its layer-(l+1) co-choices taken by its top
                       ⌈E/5⌉ successors (pooled over e, mean over layers and domains); `_independent` is the
                       same with layer l+1 shuffled across the domain's tokens (no affinity)
    window_tv          TV of 1024-token windows of one domain from that domain's mean, mean over layers

Interpretation choices (FACTS.md gives a number, not a formula): "chance" for reuse is uniform chance
(as the Mixtral figure states, 12.5% = 1/8); cache hit rates are out of sample (split by request).
Point values in FACTS.md become bands (see FACTS_RANGES).

Shape legend: T tokens, L layers, E experts, K top-k, D domains. Pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from services.placement.traces import RoutingTrace, node_layer_counts

# name -> (low, high). FACTS.md ranges; point values (cache hit rates) as point ± a band about a quarter
# of the measured own−other gap or ±0.03, whichever is larger; the gap itself is checked too.
FACTS_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "deepseek-v2-lite": {
        "entropy": (0.88, 0.96),
        "busiest_over_mean": (3.5, 5.6),
        "busiest_over_mean_max": (0.0, 7.7),
        "top25_share": (0.45, 0.65),
        "domain_tv": (0.29, 0.44),
        "cache_own": (0.47, 0.59),
        "cache_other": (0.23, 0.35),
        "cache_gap": (0.18, 0.30),
        "reuse_vs_chance": (2.8, 3.1),
        "next_layer_top20": (0.62, 0.74),
        "next_layer_top20_independent": (0.39, 0.59),
        "window_tv": (0.03, 0.08),
    },
    "mixtral-8x7b": {
        "entropy": (0.98, 0.99),
        "busiest_over_mean": (1.2, 1.45),
        "top25_share": (0.29, 0.34),
        "domain_tv": (0.02, 0.10),
        "cache_own": (0.27, 0.33),
        "cache_other": (0.25, 0.31),
        "cache_gap": (-0.01, 0.05),
        "top1_repeat": (0.14, 0.28),
    },
}


@dataclass(frozen=True)
class Stat:
    """One statistic: its values over domains (or pairs) and the range FACTS.md allows."""

    name: str
    values: tuple[float, ...]
    low: float
    high: float

    @property
    def ok(self) -> bool:
        return all(self.low - 1e-9 <= v <= self.high + 1e-9 for v in self.values)

    def line(self) -> str:
        vals = ", ".join(f"{v:.3f}" for v in self.values)
        flag = "ok" if self.ok else "OUT OF RANGE"
        return f"{self.name:30s} [{vals}]  FACTS {self.low:.2f}–{self.high:.2f}  {flag}"


def usage(trace: RoutingTrace) -> np.ndarray:
    """u [D, L, E]: per-domain selection shares (tokens of unknown domain skipped)."""
    keep = trace.domain >= 0
    counts = node_layer_counts(trace.experts[keep], trace.domain[keep], len(trace.meta.domains), trace.num_experts)
    return np.asarray(counts / np.maximum(counts.sum(-1, keepdims=True), 1.0))


def routing_stats(trace: RoutingTrace, seed: int = 0) -> dict[str, tuple[float, ...]]:
    """Every statistic above, each as a tuple over domains (or domain pairs); see the module docstring."""
    u = usage(trace)
    present = [d for d in range(u.shape[0]) if u[d].sum() > 0]
    u = u[present]
    E = trace.num_experts
    top_n = math.ceil(E / 4)
    srt = -np.sort(-u, axis=-1)
    ent = -(u * np.log(np.where(u > 0, u, 1.0))).sum(-1) / math.log(E)
    out: dict[str, tuple[float, ...]] = {
        "entropy": tuple(ent.mean(1)),
        "busiest_over_mean": tuple((srt[..., 0] * E).mean(1)),
        "busiest_over_mean_max": (float((srt[..., 0] * E).max()),),
        "top25_share": tuple(srt[..., :top_n].sum(-1).mean(1)),
        "domain_tv": tuple(
            float(0.5 * np.abs(u[a] - u[b]).sum(-1).mean()) for a in range(len(present)) for b in range(a)
        ),
    }
    out.update(_cache_hits(trace, present, top_n))
    out.update(_adjacent(trace))
    out.update(_next_layer(trace, present, np.random.default_rng(seed)))
    out["window_tv"] = _window_tv(trace, present, u)
    return out


def check(stats: dict[str, tuple[float, ...]], preset: str) -> list[Stat]:
    """The statistics FACTS.md gives for `preset`, each with its range."""
    return [Stat(name, stats[name], lo, hi) for name, (lo, hi) in FACTS_RANGES[preset].items()]


def _cache_hits(trace: RoutingTrace, domains: list[int], top_n: int) -> dict[str, tuple[float, ...]]:
    D, E = len(trace.meta.domains), trace.num_experts
    first = np.zeros(trace.num_tokens, dtype=bool)
    for d in domains:
        reqs = np.unique(trace.request[trace.domain == d])
        first |= np.isin(trace.request, reqs[: len(reqs) // 2])
    keep = trace.domain >= 0
    a = node_layer_counts(trace.experts[first & keep], trace.domain[first & keep], D, E)
    b = node_layer_counts(trace.experts[~first & keep], trace.domain[~first & keep], D, E)
    total = a + b
    own: list[float] = []
    other: list[float] = []
    gap: list[float] = []
    for d in domains:
        cache = np.argsort(-a[d], axis=-1, kind="stable")[:, :top_n]             # [L, n]
        own.append(_hit_rate(b[d], cache))
        others = [_hit_rate(total[o], cache) for o in domains if o != d]
        other.extend(others)
        gap.append(own[-1] - float(np.mean(others)) if others else 0.0)
    return {"cache_own": tuple(own), "cache_other": tuple(other), "cache_gap": tuple(gap)}


def _hit_rate(counts: np.ndarray, cache: np.ndarray) -> float:
    """Share of selections (counts [L, E]) that fall in the cache ([L, n] experts), mean over layers."""
    hits = np.take_along_axis(counts, cache, -1).sum(-1) / np.maximum(counts.sum(-1), 1)
    return float(hits.mean())


def _adjacent_pairs(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray]:
    """Indices (i, j) of tokens j that directly follow token i in the same request."""
    order = np.lexsort((trace.position, trace.request))
    r, p = trace.request[order], trace.position[order]
    ok = (r[1:] == r[:-1]) & (p[1:] == p[:-1] + 1)
    return order[:-1][ok], order[1:][ok]


def _adjacent(trace: RoutingTrace) -> dict[str, tuple[float, ...]]:
    i, j = _adjacent_pairs(trace)
    if i.size == 0:
        return {"top1_repeat": (float("nan"),), "reuse_vs_chance": (float("nan"),)}
    a, b = trace.experts[i], trace.experts[j]                                    # [P, L, K]
    repeat = float((a[..., 0] == b[..., 0]).mean())
    overlap = (a[..., :, None] == b[..., None, :]).sum((-1, -2)).mean()
    K, E = trace.top_k, trace.num_experts
    return {"top1_repeat": (repeat,), "reuse_vs_chance": (float(overlap) / (K * K / E),)}


def _top_share(a: np.ndarray, b: np.ndarray, num_experts: int) -> float:
    """Pooled top-⌈E/5⌉ successor share: a, b [T, K] experts at layers l and l+1."""
    K, E = a.shape[1], num_experts
    idx = (a[:, :, None].astype(np.int64) * E + b[:, None, :]).ravel()
    c = np.bincount(idx, minlength=E * E).reshape(E, E)
    n = math.ceil(E / 5)
    return float(-np.sort(-c, axis=1)[:, :n].sum() / max(c.sum(), 1)) if K else 0.0


def _next_layer(trace: RoutingTrace, domains: list[int], rng: np.random.Generator) -> dict[str, tuple[float, ...]]:
    E, L = trace.num_experts, trace.num_layers
    real, indep = [], []
    for d in domains:
        x = trace.experts[trace.domain == d]
        shuffled = x[rng.permutation(len(x))]
        real.append(np.mean([_top_share(x[:, i], x[:, i + 1], E) for i in range(L - 1)]))
        indep.append(np.mean([_top_share(x[:, i], shuffled[:, i + 1], E) for i in range(L - 1)]))
    return {"next_layer_top20": tuple(map(float, real)), "next_layer_top20_independent": tuple(map(float, indep))}


def _window_tv(trace: RoutingTrace, domains: list[int], u: np.ndarray, window: int = 1024) -> tuple[float, ...]:
    out = []
    for k, d in enumerate(domains):
        x = trace.experts[trace.domain == d]
        tvs = []
        for s in range(0, len(x) - window + 1, window):
            w = node_layer_counts(x[s : s + window], np.zeros(window, dtype=np.int64), 1, trace.num_experts)[0]
            w = w / w.sum(-1, keepdims=True)
            tvs.append(0.5 * np.abs(w - u[k]).sum(-1).mean())
        out.append(float(np.mean(tvs)) if tvs else float("nan"))
    return tuple(out)
