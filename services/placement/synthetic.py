"""Seeded synthetic routing traces, calibrated to real MoE routing (see `calibration.py` and FACTS.md).

Generative model, per request (one domain, one node) and token position, layer by layer:

    logit[e] = popularity[d, l, e]                 domain skew: shared + domain-specific log-normal parts
             + topic_boost · [e in topic(z, l)]    co-activation: a sticky latent topic z per token picks
                                                    a correlated group of experts in every layer
             + reuse_bonus · [e chosen by the previous token of the request at layer l]
    top-k = Gumbel-top-k(logit)                    i.e. k distinct experts sampled ∝ softmax(logit)

The topic z is shared by all layers of one token (next-layer affinity and co-activation) and stays
from one token to the next with probability `topic_stay` (adjacent-token reuse); otherwise it is
redrawn from the request's own topic mix (Dirichlet, `topic_focus`), so windows of requests vary. A node draws each
request's domain from its domain mix; a `Shift` switches a node's mix from a given request on.

Shape legend: R requests, P positions, T tokens, L MoE layers, E experts, K top-k, D domains,
Z topics per domain, N nodes. Pure numpy; nothing here imports nats.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from services.placement.errors import InvalidInputError
from services.placement.traces import RoutingTrace, TraceMeta

DOMAIN_NAMES = ("code", "prose", "math", "chat", "legal", "medical", "news", "dialogue")


@dataclass(frozen=True)
class RoutingParams:
    """Knobs of the generative model (logit units); the presets are calibrated with `calibration.py`."""

    shared_sigma: float         # std of the log-popularity part common to all domains
    domain_sigma: float         # std of the domain-specific log-popularity part
    curve: float                # shape of the popularity spread (see _spread)
    topics: int                 # latent topics per domain
    common_topics: int          # of which the first few are the same in every domain
    topic_size: int             # experts a topic boosts per layer
    topic_boost: float
    topic_stay: float           # probability the next token keeps its topic
    topic_focus: float          # Dirichlet concentration of a request's own topic mix (small = focused)
    reuse_bonus: float          # bonus for the previous token's experts at the same layer


@dataclass(frozen=True)
class ModelShape:
    """The MoE shape a trace imitates, and the routing parameters calibrated for it."""

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    num_shared_experts: int
    hidden_size: int
    expert_bytes: int           # one routed expert's weights (bf16), for migration cost
    routing: RoutingParams
    bytes_per_element: int = 2
    kv_bytes_per_token_layer: int = 0   # KV cache of one token position in one layer (bf16)

    @property
    def bytes_per_token(self) -> int:
        return self.hidden_size * self.bytes_per_element


PRESETS: dict[str, ModelShape] = {
    # DeepSeek-V2-Lite: 26 MoE layers (layer 0 dense) × 64 routed experts, top-6, 2 shared; hidden 2048.
    # Strong topics (a token takes most of its 6 experts from its topic's 10) are what next-layer
    # affinity 0.62–0.74 needs; 3 of 9 topics common to all domains keep domains 0.29–0.44 apart.
    "deepseek-v2-lite": ModelShape(
        name="deepseek-v2-lite", num_layers=26, num_experts=64, top_k=6, num_shared_experts=2,
        hidden_size=2048, expert_bytes=17_300_000, kv_bytes_per_token_layer=(512 + 64) * 2,  # MLA latent + rope key
        routing=RoutingParams(
            shared_sigma=0.1, domain_sigma=0.45, curve=-0.3, topics=9, common_topics=3, topic_size=10,
            topic_boost=4.0, topic_stay=0.15, topic_focus=2.0, reuse_bonus=0.6,
        ),
    ),
    # Mixtral-8x7B: 32 MoE layers × 8 experts, top-2; hidden 4096. Nearly flat, as measured.
    "mixtral-8x7b": ModelShape(
        name="mixtral-8x7b", num_layers=32, num_experts=8, top_k=2, num_shared_experts=0,
        hidden_size=4096, expert_bytes=352_000_000, kv_bytes_per_token_layer=2 * 8 * 128 * 2,  # K and V, 8 heads
        routing=RoutingParams(
            shared_sigma=0.16, domain_sigma=0.1, curve=0.5, topics=4, common_topics=1, topic_size=2,
            topic_boost=0.3, topic_stay=0.3, topic_focus=2.0, reuse_bonus=0.8,
        ),
    ),
}
# DeepSeek-V3 shape (58 × 256, top-8) for solve-time benchmarks; routing borrowed from V2-Lite, uncalibrated.
PRESETS["deepseek-v3"] = replace(
    PRESETS["deepseek-v2-lite"], name="deepseek-v3", num_layers=58, num_experts=256, top_k=8,
    num_shared_experts=1, hidden_size=7168, expert_bytes=44_000_000,
)


def get_preset(name: str) -> ModelShape:
    if name not in PRESETS:
        raise InvalidInputError(f"unknown model shape {name!r}; accepted: {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class Shift:
    """From its `at_request`-th request on (0-based, counted per node), `node` draws domains from `mix`."""

    node: int
    at_request: int
    mix: tuple[float, ...]


@dataclass(frozen=True)
class Traffic:
    """Who sends what: per-node domain mixes [N][D], requests per node, request lengths, shifts."""

    mixes: tuple[tuple[float, ...], ...]
    requests_per_node: int
    tokens_per_request: tuple[int, int] = (32, 96)   # inclusive range, drawn uniformly
    shifts: tuple[Shift, ...] = ()
    domains: tuple[str, ...] = field(default=())

    @property
    def num_nodes(self) -> int:
        return len(self.mixes)

    @property
    def num_domains(self) -> int:
        return len(self.mixes[0])

    def domain_names(self) -> tuple[str, ...]:
        if self.domains:
            return self.domains
        return tuple(DOMAIN_NAMES[d] if d < len(DOMAIN_NAMES) else f"domain{d}" for d in range(self.num_domains))

    @classmethod
    def dedicated(
        cls, num_nodes: int, num_domains: int, requests_per_node: int, purity: float = 1.0,
        tokens_per_request: tuple[int, int] = (32, 96),
    ) -> Traffic:
        """Node n serves domain n mod D with probability `purity`, the others share the rest evenly."""
        mixes = tuple(_mix(n % num_domains, num_domains, purity) for n in range(num_nodes))
        return cls(mixes=mixes, requests_per_node=requests_per_node, tokens_per_request=tokens_per_request)

    def with_switch(self, at_request: int, purity: float = 1.0) -> Traffic:
        """Every node n switches to domain (dominant + 1) mod D from request `at_request` on."""
        shifts = tuple(
            Shift(n, at_request, _mix((int(np.argmax(m)) + 1) % self.num_domains, self.num_domains, purity))
            for n, m in enumerate(self.mixes)
        )
        return replace(self, shifts=shifts)


def _mix(dominant: int, num_domains: int, purity: float) -> tuple[float, ...]:
    if num_domains == 1:
        return (1.0,)
    rest = (1.0 - purity) / (num_domains - 1)
    return tuple(purity if d == dominant else rest for d in range(num_domains))


def _check_traffic(traffic: Traffic) -> None:
    mixes = np.asarray(traffic.mixes, dtype=np.float64)
    if mixes.ndim != 2 or mixes.shape[0] < 1 or mixes.shape[1] < 1:
        raise InvalidInputError(f"Traffic.mixes must be [nodes][domains], got shape {mixes.shape}")
    if np.any(mixes < 0) or not np.allclose(mixes.sum(1), 1.0):
        raise InvalidInputError("every domain mix must be >= 0 and sum to 1")
    lo, hi = traffic.tokens_per_request
    if traffic.requests_per_node < 1 or not 1 <= lo <= hi:
        raise InvalidInputError("need requests_per_node >= 1 and 1 <= min tokens <= max tokens per request")
    for s in traffic.shifts:
        if not 0 <= s.node < traffic.num_nodes or len(s.mix) != traffic.num_domains:
            raise InvalidInputError(f"shift {s} names an unknown node or has a mix of the wrong length")


@dataclass(frozen=True)
class _World:
    """The fixed random structure of one seed: popularities and topics."""

    popularity: np.ndarray      # [D, L, E] logits
    topic_boost: np.ndarray     # [D, Z, L, E] logits


def _spread(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float, curve: float) -> np.ndarray:
    """Logits with standard deviation sigma in a random order per row: a fixed skew per layer rather
    than a lucky draw per seed. curve > 0 spaces them on a concave curve (a few rarely used experts, a
    flat top: low entropy without an outlier busiest expert), curve < 0 on a convex one (a peaked top)."""
    u = np.linspace(-1.0, 1.0, shape[-1])
    q = u - curve * u * u
    q = (q - q.mean()) / q.std() * sigma
    return np.asarray(rng.permuted(np.broadcast_to(q, shape), axis=-1))


def _world(shape: ModelShape, num_domains: int, rng: np.random.Generator) -> _World:
    p, L, E = shape.routing, shape.num_layers, shape.num_experts
    shared = _spread(rng, (1, L, E), p.shared_sigma, p.curve)
    own = _spread(rng, (num_domains, L, E), p.domain_sigma, p.curve)
    boost = np.zeros((num_domains, p.topics, L, E))
    for d in range(num_domains):
        for z in range(p.topics):
            if d and z < p.common_topics:
                boost[d, z] = boost[0, z]
                continue
            # A domain's own topic prefers experts the domain already likes a little (weighted draw);
            # a common topic picks uniformly, so it adds no hot expert shared by all domains.
            w = np.exp(0.5 * (shared[0] + own[d]) if z >= p.common_topics else np.zeros((L, E)))
            for layer in range(L):
                pick = rng.choice(E, size=min(p.topic_size, E), replace=False, p=w[layer] / w[layer].sum())
                boost[d, z, layer, pick] = p.topic_boost
    return _World(popularity=shared + own, topic_boost=boost)


def _requests(traffic: Traffic, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Requests in arrival order, nodes interleaved: node [R], domain [R], length [R]."""
    n_nodes, per_node = traffic.num_nodes, traffic.requests_per_node
    node = np.tile(np.arange(n_nodes), per_node)
    index = np.repeat(np.arange(per_node), n_nodes)          # request index within its node
    mixes = np.asarray(traffic.mixes, dtype=np.float64)[node]  # [R, D]
    for s in traffic.shifts:
        mixes[(node == s.node) & (index >= s.at_request)] = s.mix
    u = rng.random(node.size)[:, None]
    domain = np.minimum((u > np.cumsum(mixes, axis=1)).sum(1), traffic.num_domains - 1)
    lo, hi = traffic.tokens_per_request
    length = rng.integers(lo, hi + 1, size=node.size)
    return node, domain, length


def generate(shape: ModelShape, traffic: Traffic, seed: int = 0) -> RoutingTrace:
    """A routing trace for `traffic` on a model of `shape`; equal seeds give equal traces."""
    _check_traffic(traffic)
    rng = np.random.default_rng(seed)
    world = _world(shape, traffic.num_domains, rng)
    node, domain, length = _requests(traffic, rng)
    experts, weights = _route(shape, world, domain, length, rng)
    R, P = length.size, int(length.max())
    valid = np.arange(P)[None, :] < length[:, None]           # [R, P]
    req = np.broadcast_to(np.arange(R)[:, None], (R, P))[valid]
    pos = np.broadcast_to(np.arange(P)[None, :], (R, P))[valid]
    meta = TraceMeta(
        model=shape.name, moe_layers=tuple(range(1, shape.num_layers + 1)), num_experts=shape.num_experts,
        top_k=shape.top_k, hidden_size=shape.hidden_size, domains=traffic.domain_names(),
        nodes=tuple(f"node{n}" for n in range(traffic.num_nodes)), num_shared_experts=shape.num_shared_experts,
        bytes_per_element=shape.bytes_per_element, extra={"synthetic_seed": seed},
    )
    return RoutingTrace(
        experts=experts[valid], weights=weights[valid], node=node[req], domain=domain[req],
        request=req, position=pos, meta=meta,
    )


def _route(
    shape: ModelShape, world: _World, domain: np.ndarray, length: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """experts [R, P, L, K] int16 and weights [R, P, L, K] float16 (entries past a request's end unused)."""
    p, L, E, K = shape.routing, shape.num_layers, shape.num_experts, shape.top_k
    R, P = length.size, int(length.max())
    experts = np.zeros((R, P, L, K), dtype=np.int16)
    weights = np.zeros((R, P, L, K), dtype=np.float16)
    rows = np.arange(R)[:, None]
    # Each request has its own topic mix, so usage over a window of requests moves a little.
    topic_cdf = np.cumsum(rng.dirichlet(np.full(p.topics, p.topic_focus), size=R), axis=1)   # [R, Z]

    def draw() -> np.ndarray:
        return np.asarray(np.minimum((rng.random((R, 1)) > topic_cdf).sum(1), p.topics - 1))

    topic = draw()
    pop = world.popularity[domain]                             # [R, L, E]
    for pos in range(P):
        if pos:
            topic = np.where(rng.random(R) >= p.topic_stay, draw(), topic)
        boost = world.topic_boost[domain, topic]               # [R, L, E]
        for layer in range(L):
            logit = pop[:, layer] + boost[:, layer]
            if pos:
                logit[rows, experts[:, pos - 1, layer].astype(np.int64)] += p.reuse_bonus
            noisy = logit - np.log(-np.log(rng.random((R, E))))
            top = np.argpartition(-noisy, K - 1, axis=1)[:, :K] if K < E else np.tile(np.arange(E), (R, 1))
            val = np.take_along_axis(noisy, top, axis=1)
            order = np.argsort(-val, axis=1)
            chosen = np.take_along_axis(top, order, axis=1)
            val = np.take_along_axis(val, order, axis=1)
            w = np.exp(val - val[:, :1])
            experts[:, pos, layer] = chosen
            weights[:, pos, layer] = w / w.sum(axis=1, keepdims=True)
    return experts, weights
