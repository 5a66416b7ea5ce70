"""Topology files: the nodes (edge servers), their expert hosts and each node's link to the hub.

A topology is TOML or JSON with the same structure (see `topologies/*.toml`):

    dtype = "float32"                 # expert weight dtype on the hosts (sizes the placement)
    [[nodes]]
    name = "edge-a"
    link = { delay_ms = 2.0, rate_mbit = 500 }   # one way; omit for an ideal link
    [[nodes.hosts]]
    name = "edge-a-gpu0"
    memory_mb = 64                    # budget for routed expert weights, MiB
    device = "cpu"                    # or "cuda", "cuda:1"
    speed = 1.0                       # relative compute speed (placement input)

`initial_placement` is the static placement the launcher uses until the placement service exists:
every (layer, expert) on exactly one host, dealt round-robin over the hosts (nodes interleaved),
never over a host's memory. Pure: no NATS, no files besides `load_topology`'s.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from shared.dtypes import DtypeName
from shared.linkemu import LinkShape
from shared.schemas import describe_validation_error
from shared.subjects import NAME_PATTERN


class TopologyError(ValueError):
    """A topology file is unreadable or invalid; the message names the file and the field."""


class PlacementError(TopologyError):
    """The topology's hosts cannot hold every expert of the model."""


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HostSpec(_Spec):
    name: str = Field(pattern=NAME_PATTERN, description="unique host name (a subject token)")
    memory_mb: float | None = Field(None, gt=0, le=2**24, description="memory budget for routed experts, MiB")
    slots: int | None = Field(None, ge=0, le=2**20, description="most experts it holds (and within memory_mb)")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device of the experts")
    speed: float = Field(1.0, gt=0, le=1000, description="relative compute speed (1.0 = reference)")
    embedded: bool = Field(
        True, description="lives in its node's gating process (a direct call for the node's tokens); false: a process"
    )

    @model_validator(mode="after")
    def _sized(self) -> HostSpec:
        if self.memory_mb is None and self.slots is None:
            raise ValueError(f"host {self.name!r} needs memory_mb (MiB) or slots (expert count)")
        return self

    def memory_limit_mb(self, expert_bytes: int) -> float:
        """The expert host's memory budget, MiB: memory_mb, or room for its slots (plus 1 MiB)."""
        if self.memory_mb is not None:
            return self.memory_mb
        return (self.slots or 0) * expert_bytes / 2**20 + 1.0


class LinkSpec(_Spec):
    delay_ms: float = Field(0.0, ge=0, le=10_000, description="one-way delay to the hub, milliseconds")
    rate_mbit: float | None = Field(None, gt=0, le=1_000_000, description="Mbit/s per direction; None = unlimited")

    def shape(self) -> LinkShape:
        return LinkShape.from_ms_mbit(self.delay_ms, self.rate_mbit)


class NodeLink(LinkSpec):
    """A node's link to the hub, named: how the placement service and the gatings learn the topology's
    distances (PRISM_*_LINKS, a JSON list in the topology's node order)."""

    node: str = Field(pattern=NAME_PATTERN, description="node name")


NODE_LINKS = TypeAdapter(list[NodeLink])
"""Reads and writes a JSON list of NodeLink (PRISM_*_LINKS, KV `prism_placement` key `links`)."""


class NodeSpec(_Spec):
    name: str = Field(pattern=NAME_PATTERN, description="node (edge server) name (a subject token)")
    hosts: list[HostSpec] = Field(min_length=1, description="expert hosts of this node")
    link: LinkSpec = Field(LinkSpec(delay_ms=0.0, rate_mbit=None), description="this node's link to the hub")


class Topology(_Spec):
    nodes: list[NodeSpec] = Field(min_length=1, max_length=64)
    dtype: DtypeName = Field("float32", description="expert weight dtype")

    @model_validator(mode="after")
    def _unique_names(self) -> Topology:
        _check_unique((n.name for n in self.nodes), "node")
        _check_unique((h.name for n in self.nodes for h in n.hosts), "host")
        return self

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise TopologyError(f"no node {name!r}; the topology has {', '.join(n.name for n in self.nodes)}")

    def hosts(self) -> list[tuple[NodeSpec, HostSpec]]:
        """Every (node, host), node by node."""
        return [(node, host) for node in self.nodes for host in node.hosts]

    def links(self) -> list[NodeLink]:
        """Each node's link to the hub, in node order."""
        return [NodeLink(node=n.name, **n.link.model_dump()) for n in self.nodes]

    def links_json(self) -> str:
        """`links()` as the services take them (PRISM_GATING_LINKS, PRISM_PLACEMENT_LINKS)."""
        return NODE_LINKS.dump_json(self.links()).decode()

    def host_node(self) -> dict[str, str]:
        """Host name → node name."""
        return {host.name: node.name for node, host in self.hosts()}


def _check_unique(names: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} name {name!r} appears more than once; {what} names must be unique")
        seen.add(name)


def parse_topology(data: Any, source: str = "topology") -> Topology:
    """Validate already-decoded TOML/JSON data; errors name `source` and the offending field.

    Files in the `prism place` format (services/placement/topology.py: `link_defaults`, `expert_mb`,
    hosts with `slots` / `memory_gb`) are accepted too and converted (see `_from_placement_format`).
    """
    if not isinstance(data, dict):
        raise TopologyError(f"{source}: expected a table/object with 'nodes', got {type(data).__name__}")
    if is_placement_format(data):
        data = _from_placement_format(data, source)
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        raise TopologyError(f"{source}: {describe_validation_error(exc)}") from None


_PLACEMENT_TOP_KEYS = {"expert_mb", "link_defaults", "links", "nodes"}
_PLACEMENT_HOST_KEYS = {"slots", "memory_gb", "speed"}
_LAUNCHER_HOST_KEYS = {"name", "memory_mb", "device"}  # keys only this format's hosts have
PLACEMENT_DEFAULT_RTT_MS = 4.0
PLACEMENT_DEFAULT_RATE_MBIT = 500.0


def is_placement_format(data: Any) -> bool:
    """Whether decoded `data` is in `prism place`'s own format rather than this one, told by keys only
    one of them has (both readers use this, so a file means the same to `prism up` and `prism place`)."""
    if not isinstance(data, dict):
        return False
    if {"expert_mb", "link_defaults", "links"} & data.keys():
        return True
    nodes = [n for n in data["nodes"] if isinstance(n, dict)] if isinstance(data.get("nodes"), list) else []
    hosts = [h for n in nodes if isinstance(n.get("hosts"), list) for h in n["hosts"] if isinstance(h, dict)]
    if "dtype" in data or any("link" in n for n in nodes) or any(_LAUNCHER_HOST_KEYS & h.keys() for h in hosts):
        return False
    return any(_PLACEMENT_HOST_KEYS & h.keys() for h in hosts)


def _from_placement_format(data: dict[str, Any], source: str) -> dict[str, Any]:
    """`prism place` topology → this format. Its links are node-to-node round trips; here every
    node reaches the others through the hub, so a default round trip R becomes a one-way delay
    R/4 per node (node → hub → node = 2 × 2 × R/4 = R). Per-pair [[links]] cannot be a star."""
    unknown = set(data) - _PLACEMENT_TOP_KEYS
    if unknown:
        raise TopologyError(f"{source}: unknown keys {sorted(unknown)}; accepted: {sorted(_PLACEMENT_TOP_KEYS)}")
    if data.get("links"):
        raise TopologyError(
            f"{source}: per-pair [[links]] cannot be emulated (each node links to the hub); "
            "use [link_defaults] or a per-node `link = {delay_ms, rate_mbit}`"
        )
    defaults = data.get("link_defaults") or {}
    if not isinstance(defaults, dict):
        raise TopologyError(f"{source}: link_defaults must be a table/object")
    where = f"{source}: link_defaults"
    link = {
        "delay_ms": _number(defaults.get("rtt_ms", PLACEMENT_DEFAULT_RTT_MS), f"{where}.rtt_ms") / 4,
        "rate_mbit": _number(defaults.get("rate_mbit", PLACEMENT_DEFAULT_RATE_MBIT), f"{where}.rate_mbit"),
    }
    nodes = data.get("nodes")
    if not isinstance(nodes, list):
        raise TopologyError(f"{source}: needs a list `nodes`")
    return {"nodes": [_placement_node(node, i, link, source) for i, node in enumerate(nodes)]}


def _placement_node(node: Any, i: int, link: dict[str, float], source: str) -> dict[str, Any]:
    if not isinstance(node, dict) or not isinstance(node.get("hosts"), list):
        raise TopologyError(f"{source}: nodes[{i}] needs a list `hosts`")
    name = str(node.get("name", f"node{i}"))
    hosts = []
    for j, host in enumerate(node["hosts"]):
        if not isinstance(host, dict) or set(host) - _PLACEMENT_HOST_KEYS:
            raise TopologyError(f"{source}: nodes[{i}].hosts[{j}] accepts {sorted(_PLACEMENT_HOST_KEYS)}")
        spec: dict[str, Any] = {"name": f"{name}-h{j}", "speed": host.get("speed", 1.0)}
        if "slots" in host:
            spec["slots"] = host["slots"]
        if "memory_gb" in host:
            spec["memory_mb"] = _number(host["memory_gb"], f"{source}: nodes[{i}].hosts[{j}].memory_gb") * 1024
        hosts.append(spec)
    return {"name": name, "hosts": hosts, "link": link}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TopologyError(f"{where} must be a number, got {value!r}")
    return float(value)


def pairwise_links(topology: Topology) -> tuple[list[list[float]], list[list[float]]]:
    """Node-to-node round trip (s) and rate (bytes/s) through the hub, [N][N] each, for the placement
    policies (`star_links` of the topology's nodes)."""
    return star_links([node.link for node in topology.nodes])


def star_links(links: list[LinkSpec]) -> tuple[list[list[float]], list[list[float]]]:
    """Round trip (s) and rate (bytes/s) between nodes that each reach the hub over `links[i]`, [N][N]
    each (0 / inf on the diagonal): rtt(a, b) = 2 × (delay_a + delay_b), rate = the slower link."""
    n = len(links)
    rtt = [[0.0] * n for _ in range(n)]
    rate = [[math.inf] * n for _ in range(n)]
    shapes = [link.shape() for link in links]
    for a, shape_a in enumerate(shapes):
        for b, shape_b in enumerate(shapes):
            if a != b:
                rtt[a][b] = 2 * (shape_a.delay_s + shape_b.delay_s)
                rate[a][b] = min((x.rate_Bps for x in (shape_a, shape_b) if x.rate_Bps is not None), default=math.inf)
    return rtt, rate


def load_topology(path: str | Path) -> Topology:
    """Read a `.toml` or `.json` topology file."""
    return parse_topology(read_document(path), str(path))


def read_document(path: str | Path) -> Any:
    """The parsed contents of a topology file (`.json` → JSON, anything else → TOML), in either format."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(f"cannot read topology file {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise TopologyError(f"topology file {path} is not valid {kind}: {exc}") from None


def simple_topology(
    nodes: int,
    hosts_per_node: int,
    *,
    memory_mb: float = 4096.0,
    delay_ms: float = 0.0,
    rate_mbit: float | None = None,
    embedded: bool = True,
) -> Topology:
    """`nodes` nodes `node0..`, each with `hosts_per_node` CPU hosts `node0-h0..` (in the node's gating
    process, or processes of their own when not `embedded`), equal links."""
    if not 1 <= nodes <= 64 or not 1 <= hosts_per_node <= 64:
        raise TopologyError(f"nodes and hosts per node must be 1..64, got {nodes} and {hosts_per_node}")
    data = {
        "nodes": [
            {
                "name": f"node{n}",
                "hosts": [
                    {"name": f"node{n}-h{h}", "memory_mb": memory_mb, "embedded": embedded}
                    for h in range(hosts_per_node)
                ],
                "link": {"delay_ms": delay_ms, "rate_mbit": rate_mbit},
            }
            for n in range(nodes)
        ]
    }
    return parse_topology(data, "--nodes/--hosts-per-node")


def host_slots(host: HostSpec, expert_bytes: int) -> int:
    """Experts of `expert_bytes` bytes the host holds: what fits in memory_mb, at most `slots`."""
    if expert_bytes <= 0:
        raise PlacementError(f"expert size must be > 0 bytes, got {expert_bytes}")
    fit = math.floor(host.memory_mb * 2**20 / expert_bytes) if host.memory_mb is not None else 2**20
    return min(fit, host.slots) if host.slots is not None else fit


def initial_placement(
    topology: Topology, layers: Iterable[int], num_experts: int, expert_bytes: int
) -> dict[str, list[tuple[int, int]]]:
    """Host name → sorted (layer, expert) pairs: each expert once, round-robin, within memory.

    layers: the model's MoE layer indices; num_experts: routed experts per layer (E);
    expert_bytes: bytes of one expert at the topology's dtype. Hosts are visited with nodes
    interleaved (node0's first host, node1's first host, ..., node0's second host, ...) so that
    consecutive experts land on different nodes; a full host is skipped.
    Raises PlacementError when the hosts together have fewer slots than the model has experts.
    """
    keys = [(layer, expert) for layer in sorted(layers) for expert in range(num_experts)]
    order = _interleaved_hosts(topology)
    free = {host.name: host_slots(host, expert_bytes) for host in order}
    capacity = sum(free.values())
    if capacity < len(keys):
        need_mb = len(keys) * expert_bytes / 2**20
        have_mb = sum(h.memory_limit_mb(expert_bytes) for h in order)
        raise PlacementError(
            f"the topology cannot hold the model: {len(keys)} experts of {expert_bytes / 2**20:.2f} MiB "
            f"need {need_mb:.1f} MiB, but its {len(order)} hosts have {have_mb:.1f} MiB "
            f"({capacity} expert slots); add hosts or memory_mb"
        )
    plan: dict[str, list[tuple[int, int]]] = {host.name: [] for host in order}
    cursor = 0
    for key in keys:
        while free[order[cursor % len(order)].name] == 0:
            cursor += 1
        name = order[cursor % len(order)].name
        plan[name].append(key)
        free[name] -= 1
        cursor += 1
    return plan


def _interleaved_hosts(topology: Topology) -> list[HostSpec]:
    deepest = max(len(node.hosts) for node in topology.nodes)
    return [node.hosts[i] for i in range(deepest) for node in topology.nodes if i < len(node.hosts)]
