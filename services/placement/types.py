"""Data types shared by the placement policies, the simulator and the placement service.

Glossary:
    node      an edge server; it runs the gating and the dense part of the model for its own tokens.
    host      one GPU/CPU of a node that holds routed experts; a node has one or more hosts.
    slot      room for one routed expert on a host (host memory / expert size).
    logical expert  a pair (layer, expert) of the model.
    replica   one copy of a logical expert on a host.
    remote    a (token, expert) call whose expert has no replica on the token's own node.

Shape legend:
    N nodes, H hosts, L MoE layers, E routed experts per layer, K experts chosen per token (top-k),
    S sampled tokens per node (co-activation sample).

Pure numpy: nothing here imports nats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from services.placement.errors import (
    CapacityError,
    CoverageError,
    InfeasibleError,
    InvalidInputError,
)
from services.placement.routes import check_routes, is_stay_home, kv_slots

PolicyName = Literal["uniform", "redundance", "eplb", "prism", "optimal", "latency", "pipeline", "route"]

# Published testbed (3 nodes, 500 Mbit/s links): the defaults of Cluster.from_slots.
DEFAULT_RTT_S = 0.004
DEFAULT_BANDWIDTH_BPS = 500e6 / 8


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


def _link_matrix(value: float | np.ndarray, n: int, diagonal: float, name: str) -> np.ndarray:
    """A scalar becomes an [N, N] matrix with `diagonal` on the diagonal; a matrix is checked."""
    m = np.asarray(value, dtype=np.float64)
    if m.ndim == 0:
        m = np.full((n, n), float(m))
    if m.shape != (n, n):
        raise InvalidInputError(f"{name} must be a scalar or an [{n}, {n}] matrix, got shape {m.shape}")
    m = m.copy()
    np.fill_diagonal(m, diagonal)
    return m


@dataclass(frozen=True, eq=False)
class Cluster:
    """Hosts grouped by node, and the links between nodes. Arrays are read-only copies.

    host_node      [H] int    node index of each host (every node 0..N-1 has at least one host)
    host_slots     [H] int    expert slots of each host (memory / expert size), >= 0
    host_speed     [H] float  relative compute speed (1.0 = reference), > 0
    rtt_s          [N, N] float  round trip between nodes in seconds (0 on the diagonal)
    bandwidth_Bps  [N, N] float  bytes/s between nodes (inf on the diagonal)
    """

    host_node: np.ndarray
    host_slots: np.ndarray
    host_speed: np.ndarray
    rtt_s: np.ndarray
    bandwidth_Bps: np.ndarray  # noqa: N815 (B = bytes, bps would read as bits)

    def __post_init__(self) -> None:
        node = np.asarray(self.host_node)
        slots = np.asarray(self.host_slots)
        speed = np.asarray(self.host_speed, dtype=np.float64)
        if node.ndim != 1 or node.size == 0 or slots.shape != node.shape or speed.shape != node.shape:
            raise InvalidInputError(
                "host_node, host_slots and host_speed must be non-empty 1-D arrays of one length, got "
                f"shapes {node.shape}, {slots.shape}, {speed.shape}"
            )
        for name, a in (("host_node", node), ("host_slots", slots)):
            if not np.all(np.isfinite(a)) or np.any(a != np.round(a)) or np.any(a < 0):
                raise InvalidInputError(f"{name} must hold non-negative integers, got {a.tolist()}")
        n = int(node.max()) + 1
        if set(node.astype(int).tolist()) != set(range(n)):
            raise InvalidInputError(f"every node 0..{n - 1} needs at least one host, got host_node {node}")
        if not np.all(np.isfinite(speed)) or np.any(speed <= 0):
            raise InvalidInputError(f"host_speed must be finite and > 0, got {speed.tolist()}")
        rtt = _link_matrix(self.rtt_s, n, 0.0, "rtt_s")
        bw = _link_matrix(self.bandwidth_Bps, n, np.inf, "bandwidth_Bps")
        off = ~np.eye(n, dtype=bool)
        if np.any(~np.isfinite(rtt)) or np.any(rtt < 0):
            raise InvalidInputError("rtt_s must be finite and >= 0")
        if np.any(np.isnan(bw)) or np.any(bw[off] <= 0):
            raise InvalidInputError("bandwidth_Bps must be > 0 between distinct nodes")
        object.__setattr__(self, "host_node", _frozen(node.astype(np.int64)))
        object.__setattr__(self, "host_slots", _frozen(slots.astype(np.int64)))
        object.__setattr__(self, "host_speed", _frozen(speed))
        object.__setattr__(self, "rtt_s", _frozen(rtt))
        object.__setattr__(self, "bandwidth_Bps", _frozen(bw))

    @property
    def num_nodes(self) -> int:
        return int(self.rtt_s.shape[0])

    @property
    def num_hosts(self) -> int:
        return int(self.host_node.shape[0])

    def node_slots(self) -> np.ndarray:
        """[N] int: expert slots of each node, summed over its hosts."""
        return np.bincount(self.host_node, weights=self.host_slots, minlength=self.num_nodes).astype(np.int64)

    def node_speed(self) -> np.ndarray:
        """[N] float: summed speed of each node's hosts."""
        return np.bincount(self.host_node, weights=self.host_speed, minlength=self.num_nodes)

    def hosts_of(self, node: int) -> np.ndarray:
        """Host indices of one node, ascending."""
        return np.flatnonzero(self.host_node == node)

    @classmethod
    def from_slots(
        cls,
        slots_per_node: Sequence[int],
        rtt_s: float | np.ndarray = DEFAULT_RTT_S,
        bandwidth_Bps: float | np.ndarray = DEFAULT_BANDWIDTH_BPS,  # noqa: N803
        speed: Sequence[float] | None = None,
    ) -> Cluster:
        """One host per node with the given slots (and speeds, default 1.0); scalar links apply to all pairs."""
        n = len(slots_per_node)
        return cls(
            host_node=np.arange(n),
            host_slots=np.asarray(slots_per_node),
            host_speed=np.ones(n) if speed is None else np.asarray(speed, dtype=np.float64),
            rtt_s=np.asarray(rtt_s, dtype=np.float64),
            bandwidth_Bps=np.asarray(bandwidth_Bps, dtype=np.float64),
        )


@dataclass(frozen=True, eq=False)
class Placement:
    """hosts [H, L, E] bool: host h holds a replica of logical expert (l, e). Read-only copy.

    routes [N, L] int or None: routes[h, l] is the node that executes layer l for home h's requests
    (`services.placement.routes`); None means stay-home, what every policy but `pipeline` and `route`
    returns. A stay-home table is stored as None, so equal placements compare equal.
    """

    hosts: np.ndarray
    routes: np.ndarray | None = None

    def __post_init__(self) -> None:
        h = np.asarray(self.hosts)
        if h.ndim != 3:
            raise InvalidInputError(f"Placement.hosts must be [H, L, E], got shape {h.shape}")
        object.__setattr__(self, "hosts", _frozen(h.astype(bool)))
        if self.routes is not None:
            r = np.asarray(self.routes)
            if r.ndim != 2:
                raise InvalidInputError(f"Placement.routes must be [N homes, L layers], got shape {r.shape}")
            table = check_routes(r, r.shape[0], h.shape[1])
            object.__setattr__(self, "routes", None if is_stay_home(table) else _frozen(table))

    def route_table(self, num_nodes: int) -> np.ndarray:
        """[N, L] int: the routes, stay-home rows when there are none."""
        if self.routes is None:
            return np.repeat(np.arange(num_nodes, dtype=np.int64)[:, None], self.num_layers, axis=1)
        if self.routes.shape[0] != num_nodes:
            raise InvalidInputError(f"routes name {self.routes.shape[0]} homes, the cluster has {num_nodes} nodes")
        return self.routes

    @property
    def num_layers(self) -> int:
        return int(self.hosts.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.hosts.shape[2])

    def node_view(self, cluster: Cluster) -> np.ndarray:
        """[N, L, E] bool: node n holds (l, e) on at least one of its hosts."""
        out = np.zeros((cluster.num_nodes, *self.hosts.shape[1:]), dtype=bool)
        np.logical_or.at(out, cluster.host_node, self.hosts)
        return out

    def to_triples(self, cluster: Cluster) -> list[tuple[int, int, int]]:
        """Sorted [node, layer, expert] triples, one per node that holds a replica."""
        return [(int(n), int(lay), int(e)) for n, lay, e in np.argwhere(self.node_view(cluster))]

    def equals(self, other: Placement) -> bool:
        same_routes = (self.routes is None and other.routes is None) or (
            self.routes is not None and other.routes is not None and np.array_equal(self.routes, other.routes)
        )
        return same_routes and self.hosts.shape == other.hosts.shape and bool(np.array_equal(self.hosts, other.hosts))


@dataclass(frozen=True, eq=False)
class CoActivation:
    """Which experts a token chooses together, as a sample of real top-k sets per node.

    tokens  [N, L] float     tokens seen per node and layer in the statistics window
    sets    [N, S, L, K] int experts chosen by S sampled tokens of each node, per layer; a row of -1
                              pads a node that had fewer than S tokens (see `valid`)

    A sample rather than pairwise counts [N, L, E, E]: at 64 × 58 × 256 × 256 pairwise counts take
    ~1 GB, and pairs do not give "any of the K experts is remote" or "how many distinct nodes", which
    the latency model needs; S = 64-256 tokens per node keep evaluation at N·S·L·K integer gathers.
    """

    tokens: np.ndarray
    sets: np.ndarray

    def __post_init__(self) -> None:
        tokens = np.asarray(self.tokens, dtype=np.float64)
        sets = np.asarray(self.sets)
        if sets.ndim != 4 or tokens.shape != (sets.shape[0], sets.shape[2]):
            raise InvalidInputError(
                f"CoActivation needs sets [N, S, L, K] and tokens [N, L], got {sets.shape} and {tokens.shape}"
            )
        if not np.all(np.isfinite(tokens)) or np.any(tokens < 0):
            raise InvalidInputError("CoActivation.tokens must be finite and >= 0")
        object.__setattr__(self, "tokens", _frozen(tokens))
        object.__setattr__(self, "sets", _frozen(sets.astype(np.int32)))

    @property
    def top_k(self) -> int:
        return int(self.sets.shape[3])

    @property
    def valid(self) -> np.ndarray:
        """[N, S] bool: the sample row holds a real token."""
        return np.asarray(self.sets[:, :, 0, 0] >= 0)

    @classmethod
    def from_topk(
        cls, experts: np.ndarray, node: np.ndarray, num_nodes: int, samples_per_node: int = 128
    ) -> CoActivation:
        """From a routing trace: experts [T, L, K] chosen per token, node [T] of each token.

        Takes up to `samples_per_node` tokens per node, evenly spaced over the window (deterministic,
        and spread over requests rather than one request's adjacent tokens).
        """
        experts = np.asarray(experts)
        node = np.asarray(node)
        if experts.ndim != 3 or node.shape != experts.shape[:1]:
            raise InvalidInputError(f"need experts [T, L, K] and node [T], got {experts.shape}, {node.shape}")
        _, num_layers, k = experts.shape
        sets = np.full((num_nodes, samples_per_node, num_layers, k), -1, dtype=np.int32)
        tokens = np.zeros((num_nodes, num_layers))
        for n in range(num_nodes):
            idx = np.flatnonzero(node == n)
            tokens[n] = idx.size
            if idx.size:
                take = idx[np.linspace(0, idx.size - 1, min(samples_per_node, idx.size)).astype(int)]
                sets[n, : take.size] = experts[take]
        return cls(tokens=tokens, sets=sets)

    @classmethod
    def independent(cls, freq: np.ndarray, top_k: int, samples_per_node: int = 64, seed: int = 0) -> CoActivation:
        """Synthesise sets from f alone: each token draws top_k distinct experts ∝ f, independently
        of each other (no co-activation structure). freq [N, L, E]; tokens = Σ_e f / top_k. Seeded.

        Draws by inverse CDF and redraws duplicates; after a few rounds a remaining duplicate takes the
        most used expert not chosen yet (only very peaked layers get there).
        """
        freq = np.asarray(freq, dtype=np.float64)
        n_nodes, n_layers, n_experts = freq.shape
        k = min(top_k, n_experts)
        rng = np.random.default_rng(seed)
        p = freq + 1e-12 * (freq.sum(-1, keepdims=True) == 0)  # a layer with no traffic: uniform
        p = (p / p.sum(-1, keepdims=True)).reshape(-1, n_experts)
        # Inverse CDF for all rows at once: row r's CDF shifted by r is one sorted array.
        cdf = np.cumsum(p, axis=1)
        offset = np.arange(p.shape[0])[:, None]
        u = rng.random((p.shape[0], samples_per_node * k)) + offset
        pos = np.searchsorted((cdf + offset).ravel(), u.ravel(), side="right").reshape(u.shape)
        draws = np.minimum(pos - offset * n_experts, n_experts - 1)
        sets = draws.reshape(n_nodes, n_layers, samples_per_node, k).transpose(0, 2, 1, 3).copy()
        row = np.broadcast_to(
            (np.arange(n_nodes)[:, None] * n_layers + np.arange(n_layers)[None, :])[:, None, :],
            (n_nodes, samples_per_node, n_layers),
        )
        for j in range(1, k):
            for _ in range(8):
                dup = (sets[..., :j] == sets[..., j : j + 1]).any(axis=-1)
                if not dup.any():
                    break
                r = row[dup]
                u = rng.random(r.size)
                sets[..., j][dup] = np.minimum((cdf[r] < u[:, None]).sum(axis=1), n_experts - 1)
            dup = (sets[..., :j] == sets[..., j : j + 1]).any(axis=-1)
            if dup.any():  # very peaked rows: take the most used expert not chosen yet
                left = p[row[dup]].copy()
                np.put_along_axis(left, sets[..., :j][dup], -np.inf, axis=1)
                sets[..., j][dup] = np.argmax(left, axis=1)
        return cls(tokens=freq.sum(-1) / max(k, 1), sets=sets)


@dataclass(frozen=True, eq=False)
class Workload:
    """What the latency objective needs to know about the traffic.

    batch          [N] int  tokens in one decode step at each node (continuous batching), >= 1
    bytes_per_token  float  bytes of one token's hidden state in one direction (hidden × dtype bytes);
                            a remote group sends and returns it: 2 × bytes per token per group
    expert_time_s    float  one expert invocation in a step on a speed-1.0 host, paid once per active
                            expert (weight read + launch; the simulator's SimConfig.expert_time_s)
    expert_time_per_token_s float  extra compute per (token, expert) call on a speed-1.0 host
    per_expert_messages bool  True (default): a token's hidden state travels once per remote expert
                            (what the gating sends: one row per (token, expert) in its one message
                            per host and layer); False: once per remote node holding some of its
                            experts (a gating that would dedupe tokens per node). Round trips overlap
                            either way.
    kv_slots_per_layer float  expert slots one home's requests' KV cache takes on a node per layer that
                            node executes for it (batch × context × KV bytes per token and layer /
                            expert bytes); a node executing foreign layers has that much less room
                            for experts. 0 (default): KV is not charged
    migration_cost_s [N] float  objective seconds charged per replica that `current` lacks, by the node
                            that loads it (over its own link: a node behind a slower one pays more);
                            a single value is every node's
    min_gain         float  relative gain a new plan must bring over `current` to be chosen (hysteresis)
    top_k            int    experts per token; used only when no CoActivation is given
    dense_time_s     float  the dense part of one layer of one step at the node's batch on a speed-1.0
                            host (attention, router, shared experts): it runs on the first host of the
                            node that executes the layer, before the layer's expert calls leave (the
                            simulator's and the gating's order). 0 (default): not charged
    step_rate        [N] float or None  decode steps per second each home runs on average (its tokens/s
                            over its batch): with `dense_time_s`, the load every home brings to the
                            hosts along its route: the `route` policy rehearses it in the simulator
                            (`rehearsal.py`) and estimates queueing from it (`RouteModel.load_step_times`).
                            None (default): unknown, no rehearsal and no queueing term
    tokens_per_request float or None  decode steps a request takes (its tokens): the rehearsal's request
                            length. None (default): unknown, the rehearsal's own (rehearsal.TOKENS)
    """

    batch: np.ndarray
    bytes_per_token: float = 2048 * 2
    expert_time_s: float = 40e-6
    expert_time_per_token_s: float = 0.0
    per_expert_messages: bool = True
    kv_slots_per_layer: float = 0.0
    migration_cost_s: float | np.ndarray = 0.0
    min_gain: float = 0.0
    top_k: int = 2
    dense_time_s: float = 0.0
    step_rate: np.ndarray | None = None
    tokens_per_request: float | None = None

    def __post_init__(self) -> None:
        batch = np.asarray(self.batch)
        if batch.ndim != 1 or np.any(batch < 1) or np.any(batch != np.round(batch)):
            raise InvalidInputError(f"Workload.batch must be [N] integers >= 1, got {batch.tolist()}")
        for name in ("bytes_per_token", "expert_time_s", "expert_time_per_token_s", "kv_slots_per_layer",
                     "min_gain", "dense_time_s"):
            v = float(getattr(self, name))
            if not np.isfinite(v) or v < 0:
                raise InvalidInputError(f"Workload.{name} must be finite and >= 0, got {v}")
        if self.top_k < 1:
            raise InvalidInputError(f"Workload.top_k must be >= 1, got {self.top_k}")
        object.__setattr__(self, "batch", _frozen(batch.astype(np.int64)))
        migration = np.asarray(self.migration_cost_s, dtype=np.float64)
        if migration.shape not in ((), batch.shape) or not np.all(np.isfinite(migration)) or np.any(migration < 0):
            raise InvalidInputError(f"Workload.migration_cost_s must be one value or [N] like batch, finite and >= 0, "
                                    f"got {migration.tolist()}")
        object.__setattr__(self, "migration_cost_s", _frozen(np.broadcast_to(migration, batch.shape)))
        if self.step_rate is not None:
            rate = np.asarray(self.step_rate, dtype=np.float64)
            if rate.shape != batch.shape or not np.all(np.isfinite(rate)) or np.any(rate < 0):
                raise InvalidInputError(f"Workload.step_rate must be [N] finite values >= 0 like batch, "
                                        f"got {np.asarray(self.step_rate).tolist()}")
            object.__setattr__(self, "step_rate", _frozen(rate))
        if self.tokens_per_request is not None and not 1.0 <= float(self.tokens_per_request) < np.inf:
            raise InvalidInputError(f"Workload.tokens_per_request must be a finite count >= 1, "
                                    f"got {self.tokens_per_request}")

    @property
    def node_migration_cost_s(self) -> np.ndarray:
        """[N] `migration_cost_s`: seconds charged per replica each node loads."""
        return np.asarray(self.migration_cost_s)

    @classmethod
    def uniform(cls, num_nodes: int, batch: int = 1, **kw: Any) -> Workload:
        """The same batch at every node; other fields by keyword."""
        return cls(batch=np.full(num_nodes, batch), **kw)


class Policy(Protocol):
    """Every placement policy: per-node frequencies and a cluster in, a valid placement out."""

    def __call__(
        self,
        freq: np.ndarray,
        cluster: Cluster,
        *,
        coact: CoActivation | None = None,
        current: Placement | None = None,
        workload: Workload | None = None,
    ) -> Placement: ...


def check_inputs(freq: np.ndarray, cluster: Cluster) -> np.ndarray:
    """Check f [N, L, E] against the cluster; return it as float64. Raises a PlacementError subclass."""
    f = np.asarray(freq)
    if f.ndim != 3:
        raise InvalidInputError(f"counts must have shape [nodes, layers, experts], got {f.shape}")
    if f.shape[0] != cluster.num_nodes:
        raise InvalidInputError(f"counts have {f.shape[0]} nodes but the cluster has {cluster.num_nodes}")
    if f.shape[1] == 0 or f.shape[2] == 0:
        raise InvalidInputError(f"counts need at least one layer and one expert, got {f.shape}")
    if not np.issubdtype(f.dtype, np.number) or np.issubdtype(f.dtype, np.complexfloating):
        raise InvalidInputError(f"counts must be real numbers, got dtype {f.dtype}")
    f = f.astype(np.float64)
    if not np.all(np.isfinite(f)):
        raise InvalidInputError("counts contain NaN or infinity")
    if np.any(f < 0):
        raise InvalidInputError(f"counts must be >= 0, found {f.min()}")
    need, have = f.shape[1] * f.shape[2], int(cluster.host_slots.sum())
    if have < need:
        raise InfeasibleError(f"{have} slots in total cannot hold {need} experts ({f.shape[1]} layers × {f.shape[2]})")
    return f


def proxy_objective(freq: np.ndarray, placement: Placement, cluster: Cluster) -> float:
    """Σ f[n, l, e] · (no replica of (l, e) on node n): remote (token, expert) calls."""
    f = np.asarray(freq, dtype=np.float64)
    return float(np.sum(f, where=~placement.node_view(cluster)))


def validate(
    placement: Placement, cluster: Cluster, num_layers: int, num_experts: int, kv_slots_per_layer: float = 0.0
) -> None:
    """Raise CoverageError if some expert has no replica, CapacityError if a host is over its slots
    or (with routes) a node over its slots once foreign KV takes `kv_slots_per_layer` per foreign layer."""
    h = placement.hosts
    if h.shape != (cluster.num_hosts, num_layers, num_experts):
        raise InvalidInputError(
            f"placement has shape {h.shape}, expected {(cluster.num_hosts, num_layers, num_experts)}"
        )
    missing = np.argwhere(~h.any(axis=0))
    if missing.size:
        lay, e = missing[0]
        raise CoverageError(f"{len(missing)} experts have no replica, first (layer {lay}, expert {e})")
    used = h.sum(axis=(1, 2))
    over = np.flatnonzero(used > cluster.host_slots)
    if over.size:
        k = over[0]
        raise CapacityError(f"host {k} holds {used[k]} experts but has {cluster.host_slots[k]} slots")
    if placement.routes is not None:
        table = placement.route_table(cluster.num_nodes)
        node_used = np.bincount(cluster.host_node, weights=used, minlength=cluster.num_nodes)
        room = cluster.node_slots() - kv_slots(table, cluster.num_nodes, kv_slots_per_layer)
        tight = np.flatnonzero(node_used > room)
        if tight.size:
            n = tight[0]
            raise CapacityError(f"node {n} holds {int(node_used[n])} experts but has room for {int(room[n])} "
                                "beside the foreign KV its routes put there")
