"""Topology files: nodes, their hosts, and the links between nodes, as TOML or JSON → `Cluster`.

Format (TOML shown; JSON has the same structure, chosen by the file suffix `.json`):

    expert_mb = 17.3                 # size of one routed expert; needed only for hosts given by memory

    [link_defaults]                  # every pair of distinct nodes, unless a [[links]] entry says otherwise
    rtt_ms = 4.0                     # round trip, milliseconds (>= 0)
    rate_mbit = 500                  # bandwidth, megabit/s (> 0)

    [[nodes]]
    name = "edge-a"                  # optional; default "node<i>"; links may refer to it
    hosts = [{ slots = 16 }]         # a host gives `slots`, or `memory_gb` (slots = floor(memory / expert));
                                     # `speed` is optional (relative compute speed, default 1.0)
    [[nodes]]
    name = "edge-b"
    hosts = [{ memory_gb = 24, speed = 2.0 }, { slots = 8 }]

    [[links]]                        # symmetric; nodes by name or index
    nodes = ["edge-a", "edge-b"]
    rtt_ms = 20
    rate_mbit = 100

Defaults when a file gives no link values: the published testbed's 4 ms and 500 Mbit/s. Unknown keys
are errors (a typo should not silently become a default). Nodes are indexed in file order.

`load_topology` also reads the `prism up` format (shared/topology.py, the files under topologies/);
`shared.topology.is_placement_format` tells the two apart for both readers. A `prism up` file's hosts
are sized as `prism up` sizes them (shared.topology.host_slots: floor(memory_mb MiB / one expert of a
model at the file's dtype), so it needs a model directory; every node reaches the others through the
hub, so rtt(a, b) = 2 × (delay_a + delay_b) and the bandwidth is the slower of the two links
(shared.topology.pairwise_links).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from services.placement.errors import InvalidInputError
from services.placement.types import DEFAULT_BANDWIDTH_BPS, DEFAULT_RTT_S, Cluster
from shared.dtypes import DtypeName
from shared.topology import (
    Topology,
    TopologyError,
    host_slots,
    is_placement_format,
    pairwise_links,
    parse_topology,
    read_document,
)

_TOP_KEYS = {"expert_mb", "link_defaults", "nodes", "links"}
_NODE_KEYS = {"name", "hosts"}
_HOST_KEYS = {"slots", "memory_gb", "speed"}
_LINK_KEYS = {"nodes", "rtt_ms", "rate_mbit"}


def _check_keys(table: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise InvalidInputError(f"{where} must be a table/object, got {type(table).__name__}")
    unknown = set(table) - allowed
    if unknown:
        raise InvalidInputError(f"{where}: unknown keys {sorted(unknown)}; accepted: {sorted(allowed)}")
    return table


def _number(table: dict[str, Any], key: str, where: str, *, minimum: float, strict: bool = False) -> float:
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise InvalidInputError(f"{where}.{key} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise InvalidInputError(f"{where}.{key} must be {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def _host_slots(host: dict[str, Any], where: str, expert_mb: float | None) -> int:
    if ("slots" in host) == ("memory_gb" in host):
        raise InvalidInputError(f"{where} needs exactly one of `slots` or `memory_gb`")
    if "slots" in host:
        slots = _number(host, "slots", where, minimum=0)
        if slots != int(slots):
            raise InvalidInputError(f"{where}.slots must be an integer, got {slots}")
        return int(slots)
    if expert_mb is None:
        raise InvalidInputError(f"{where} gives memory_gb, so the file needs a top-level expert_mb")
    return int(_number(host, "memory_gb", where, minimum=0) * 1024 // expert_mb)


def _link_values(table: dict[str, Any], where: str, rtt: float, bw: float) -> tuple[float, float]:
    if "rtt_ms" in table:
        rtt = _number(table, "rtt_ms", where, minimum=0) / 1e3
    if "rate_mbit" in table:
        bw = _number(table, "rate_mbit", where, minimum=0, strict=True) * 1e6 / 8
    return rtt, bw


def cluster_from_dict(doc: dict[str, Any]) -> tuple[Cluster, list[str]]:
    """Build the cluster (and node names, by index) from a parsed topology document."""
    _check_keys(doc, _TOP_KEYS, "topology")
    expert_mb = _number(doc, "expert_mb", "topology", minimum=0, strict=True) if "expert_mb" in doc else None
    nodes = doc.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise InvalidInputError("topology needs a non-empty list `nodes`")
    names, host_node, host_slots, host_speed = [], [], [], []
    for i, node in enumerate(nodes):
        _check_keys(node, _NODE_KEYS, f"nodes[{i}]")
        names.append(str(node.get("name", f"node{i}")))
        hosts = node.get("hosts")
        if not isinstance(hosts, list) or not hosts:
            raise InvalidInputError(f"nodes[{i}] needs a non-empty list `hosts`")
        for j, host in enumerate(hosts):
            where = f"nodes[{i}].hosts[{j}]"
            _check_keys(host, _HOST_KEYS, where)
            host_node.append(i)
            host_slots.append(_host_slots(host, where, expert_mb))
            host_speed.append(_number(host, "speed", where, minimum=0, strict=True) if "speed" in host else 1.0)
    if len(set(names)) != len(names):
        raise InvalidInputError(f"node names must be unique, got {names}")
    n = len(names)
    defaults = _check_keys(doc.get("link_defaults", {}), {"rtt_ms", "rate_mbit"}, "link_defaults")
    rtt0, bw0 = _link_values(defaults, "link_defaults", DEFAULT_RTT_S, DEFAULT_BANDWIDTH_BPS)
    rtt, bw = np.full((n, n), rtt0), np.full((n, n), bw0)
    for k, link in enumerate(doc.get("links", [])):
        _check_keys(link, _LINK_KEYS, f"links[{k}]")
        a, b = _link_ends(link.get("nodes"), names, f"links[{k}]")
        r, w = _link_values(link, f"links[{k}]", rtt[a, b], bw[a, b])
        rtt[a, b] = rtt[b, a] = r
        bw[a, b] = bw[b, a] = w
    cluster = Cluster(np.array(host_node), np.array(host_slots), np.array(host_speed), rtt, bw)
    return cluster, names


def _link_ends(ends: Any, names: list[str], where: str) -> tuple[int, int]:
    if not isinstance(ends, list) or len(ends) != 2:
        raise InvalidInputError(f"{where}.nodes must list two nodes (names or indices), got {ends!r}")
    out = []
    for end in ends:
        if isinstance(end, int) and not isinstance(end, bool) and 0 <= end < len(names):
            out.append(end)
        elif isinstance(end, str) and end in names:
            out.append(names.index(end))
        else:
            raise InvalidInputError(f"{where}: unknown node {end!r}; nodes are {names} or 0..{len(names) - 1}")
    if out[0] == out[1]:
        raise InvalidInputError(f"{where} links node {ends[0]!r} to itself")
    return out[0], out[1]


def load_topology(path: str | Path, model: str | Path | None = None) -> tuple[Cluster, list[str]]:
    """Read a topology file (`.json` → JSON, anything else → TOML) in this module's format or the
    `prism up` one; `model` (a checkpoint directory) sizes the hosts of the latter."""
    try:
        doc = read_document(path)
        topology = None if is_placement_format(doc) else parse_topology(doc, str(path))
    except TopologyError as e:
        raise InvalidInputError(str(e)) from None
    if topology is None:
        return cluster_from_dict(doc)
    if model is None:
        raise InvalidInputError(f"{path} is a `prism up` topology: sizing its hosts needs a model directory")
    return cluster_from_launcher(topology, expert_bytes(model, topology.dtype))


def cluster_from_launcher(topology: Topology, expert_nbytes: int) -> tuple[Cluster, list[str]]:
    """A `prism up` topology as a cluster (and node names): slots as `prism up` sizes its hosts,
    links node to node through the hub."""
    names = [node.name for node in topology.nodes]
    pairs = topology.hosts()
    rtt, rate = pairwise_links(topology)
    cluster = Cluster(
        np.array([names.index(node.name) for node, _ in pairs]),
        np.array([host_slots(host, expert_nbytes) for _, host in pairs]),
        np.array([host.speed for _, host in pairs]),
        np.array(rtt),
        np.array(rate),
    )
    return cluster, names


def expert_bytes(model: str | Path, dtype: DtypeName) -> int:
    """Bytes of one routed expert of checkpoint directory `model` at `dtype` (what `prism up` uses)."""
    # Imported here: shared.model loads torch, which files in this module's own format never need.
    from shared.model.checkpoint import load_config
    from shared.model.errors import ModelError

    try:
        config = load_config(model)
    except ModelError as e:
        raise InvalidInputError(f"invalid model directory {model}: {e}") from None
    return config.expert_nbytes(dtype)
