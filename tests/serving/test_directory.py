"""The gating's host directory serves each expert call where the placement models and the simulator
say it is served: locally when the node holds it, else at the nearest holding node through the hub
(heterogeneous links), replicas shared the same way. Fed real heartbeat payloads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.gating.directory import HostDirectory
from services.placement.planner import cluster_view
from services.placement.sim_resources import serving_hosts
from services.placement.types import Placement
from shared.schemas import HostStatus
from shared.topology import LinkSpec, NodeLink


def heartbeat(host: str, node: str, experts: list[tuple[int, int]]) -> bytes:
    status = HostStatus(host=host, node=node, device="cpu", memory_used_bytes=0, memory_limit_bytes=1 << 30,
                        experts=experts, queue_depth=0, calls_served=0, tokens_served=0, errors=0)
    return status.model_dump_json().encode()


Hosts = dict[str, tuple[str, list[tuple[int, int]]]]  # host → (node, experts)


def directory_of(node: str, links: list[NodeLink], hosts: Hosts) -> HostDirectory:
    directory = HostDirectory(node, links=links)
    for host, (host_node, experts) in hosts.items():
        directory.on_status(heartbeat(host, host_node, experts))
    return directory


def test_a_remote_expert_goes_to_the_nearest_holder_not_the_first_by_name() -> None:
    """Node c's expert 0 has replicas on a (10 ms away) and b (1 ms away): b serves it; c's own copy
    of expert 1 serves c."""
    links = [NodeLink(node="a", delay_ms=5.0), NodeLink(node="b", delay_ms=0.25), NodeLink(node="c", delay_ms=0.25)]
    hosts = {"a-h0": ("a", [(0, 0)]), "b-h0": ("b", [(0, 0), (0, 1)]), "c-h0": ("c", [(0, 1)])}
    directory = directory_of("c", links, hosts)
    assert directory.node_order() == ["c", "b", "a"]
    assert directory.route(0, [0, 1, 2]) == ({"b-h0": [0], "c-h0": [1]}, [2])
    # the same holders without links: equally near, the next node after c in the order (a) serves
    assert directory_of("c", [], hosts).route(0, [0]) == ({"a-h0": [0]}, [])


@pytest.mark.parametrize("seed", range(4))
def test_every_call_is_served_by_the_host_the_simulator_books(seed: int) -> None:
    """Random replicated placements over 4 nodes (1–3 hosts each) with uneven links, ties included:
    for every requesting node, layer and expert, the directory's host is `serving_hosts`'."""
    rng = np.random.default_rng(seed)
    nodes = ["n0", "n1", "n2", "n3"]
    delays = rng.choice([0.5, 1.0, 1.0, 3.0], size=len(nodes))  # repeated delays make ties
    rates = rng.choice([100.0, 500.0], size=len(nodes))
    links = [NodeLink(node=n, delay_ms=float(d), rate_mbit=float(r))
             for n, d, r in zip(nodes, delays, rates, strict=True)]
    host_node = [n for n in nodes for _ in range(int(rng.integers(1, 4)))]
    names = [f"{node}-h{i}" for i, node in enumerate(host_node)]
    layers, experts = 3, 8
    held = rng.random((len(names), layers, experts)) < 0.3
    held[rng.integers(0, len(names), size=(layers, experts)), np.arange(layers)[:, None], np.arange(experts)] = True
    hosts = {
        name: (node, [(int(layer), int(e)) for layer, e in np.argwhere(held[h])])
        for h, (name, node) in enumerate(zip(names, host_node, strict=True))
    }
    statuses = [HostStatus.model_validate_json(heartbeat(name, node, keys)) for name, (node, keys) in hosts.items()]
    view = cluster_view(statuses, nodes, 1, {link.node: LinkSpec(delay_ms=link.delay_ms, rate_mbit=link.rate_mbit)
                                             for link in links})
    order = [names.index(h) for h in view.hosts]
    serve = serving_hosts(Placement(held[order]), view.cluster)  # [N, L, E] index into view.hosts
    for n, node in enumerate(nodes):
        directory = directory_of(node, links, hosts)
        for layer in range(layers):
            by_host, unknown = directory.route(layer, list(range(experts)))
            assert unknown == []
            chosen = {e: host for host, es in by_host.items() for e in es}
            assert chosen == {e: view.hosts[serve[n, layer, e]] for e in range(experts)}, (node, layer)


def test_a_directory_serves_by_new_links_and_keeps_its_own_for_bad_ones() -> None:
    links = [NodeLink(node=n, delay_ms=d) for n, d in (("a", 1.0), ("b", 5.0), ("c", 0.0))]
    directory = HostDirectory("c", links=links)
    for host, node in (("a-h0", "a"), ("b-h0", "b")):
        directory.on_status(heartbeat(host, node, [(0, 0)]))
    assert directory.route(0, [0]) == ({"a-h0": [0]}, [])
    directory.use_links([{"node": "a", "delay_ms": 9.0}, {"node": "b", "delay_ms": 2.0}, {"node": "c"}])
    assert directory.route(0, [0]) == ({"b-h0": [0]}, []), "b is the nearer holder now"
    directory.use_links([{"node": "a", "delay_ms": -1}])  # refused: the links in use stay
    directory.use_links("not links")
    assert directory.route(0, [0]) == ({"b-h0": [0]}, [])


def test_a_heartbeat_with_bad_experts_is_ignored_and_the_last_good_one_serves() -> None:
    directory = directory_of("a", [], {"b-h0": ("b", [(0, 3)])})
    good = json.loads(heartbeat("b-h0", "b", [(0, 5)]))
    for experts in ({"0": "-1"}, {"0": "zz"}, {"x": "1"}, [[0, -5]], "0:5"):
        directory.on_status(json.dumps({**good, "experts": experts}).encode())
    directory.on_status(b"not json")
    assert directory.route(0, [3, 5]) == ({"b-h0": [3]}, [5])
    directory.on_status(json.dumps(good).encode())  # the mask form, as hosts send it
    assert directory.route(0, [3, 5]) == ({"b-h0": [5]}, [3])
