"""Topology files load and validate with clear errors; the static placement covers every expert
once, stays within each host's memory, spreads round-robin, and refuses what cannot fit."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.topology import (
    PlacementError,
    TopologyError,
    host_slots,
    initial_placement,
    load_topology,
    parse_topology,
    simple_topology,
)

MIB = 2**20


def test_every_bundled_topology_loads(repo_root: Path) -> None:
    files = sorted((repo_root / "topologies").iterdir())
    assert files
    for file in files:
        topology = load_topology(file)
        assert topology.nodes, file


def test_toml_and_json_give_the_same_topology(tmp_path: Path) -> None:
    data = {
        "nodes": [
            {"name": "a", "hosts": [{"name": "a0", "memory_mb": 8, "device": "cuda:1", "speed": 2}],
             "link": {"delay_ms": 3, "rate_mbit": 100}},
        ]
    }
    (tmp_path / "t.json").write_text(json.dumps(data))
    (tmp_path / "t.toml").write_text(
        '[[nodes]]\nname = "a"\nlink = { delay_ms = 3, rate_mbit = 100 }\n'
        '[[nodes.hosts]]\nname = "a0"\nmemory_mb = 8\ndevice = "cuda:1"\nspeed = 2\n'
    )
    assert load_topology(tmp_path / "t.json") == load_topology(tmp_path / "t.toml")
    link = load_topology(tmp_path / "t.toml").nodes[0].link.shape()
    assert link.delay_s == 0.003
    assert link.rate_Bps == 100e6 / 8


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "nodes: Field required"),
        ({"nodes": []}, "nodes: List should have at least 1 item"),
        ({"nodes": [{"name": "a", "hosts": []}]}, "nodes.0.hosts: List should have at least 1 item"),
        ({"nodes": [{"name": "a.b", "hosts": [{"name": "h", "memory_mb": 1}]}]}, "nodes.0.name"),
        ({"nodes": [{"name": "a", "hosts": [{"name": "h", "memory_mb": 0}]}]}, "nodes.0.hosts.0.memory_mb"),
        ({"nodes": [{"name": "a", "hosts": [{"name": "h", "memory_mb": 1, "device": "tpu"}]}]}, "device"),
        ({"nodes": [{"name": "a", "hosts": [{"name": "h", "memory_mb": 1}], "link": {"delay_ms": -1}}]}, "delay_ms"),
        ({"nodes": [{"name": "a", "hosts": [{"name": "h", "memory_mb": 1, "gpus": 2}]}]}, "gpus: Extra inputs"),
        (
            {"nodes": [{"name": "a", "hosts": [{"name": "h", "memory_mb": 1}]},
                       {"name": "b", "hosts": [{"name": "h", "memory_mb": 1}]}]},
            "host name 'h' appears more than once",
        ),
        ([1, 2], "expected a table/object"),
    ],
)
def test_invalid_topologies_name_the_field(data: object, message: str) -> None:
    with pytest.raises(TopologyError, match="^my.toml: .*" + message.replace(".", r"\.").replace("(", r"\(")):
        parse_topology(data, "my.toml")


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read topology file"):
        load_topology(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[[nodes]\n")
    with pytest.raises(TopologyError, match="is not valid TOML"):
        load_topology(tmp_path / "bad.toml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TopologyError, match="is not valid JSON"):
        load_topology(tmp_path / "bad.json")


def test_simple_topology_names_and_links() -> None:
    t = simple_topology(3, 2, memory_mb=10, delay_ms=2, rate_mbit=500)
    assert [n.name for n in t.nodes] == ["node0", "node1", "node2"]
    assert [h.name for h in t.nodes[1].hosts] == ["node1-h0", "node1-h1"]
    assert t.host_node()["node2-h1"] == "node2"
    assert t.nodes[2].link.delay_ms == 2
    with pytest.raises(TopologyError, match=r"1\.\.64"):
        simple_topology(0, 1)


def test_round_robin_interleaves_nodes() -> None:
    t = simple_topology(2, 2, memory_mb=1)
    plan = initial_placement(t, [0, 1], 4, MIB // 4)  # 4 slots per host, 8 experts
    assert plan == {
        "node0-h0": [(0, 0), (1, 0)],
        "node1-h0": [(0, 1), (1, 1)],
        "node0-h1": [(0, 2), (1, 2)],
        "node1-h1": [(0, 3), (1, 3)],
    }


def test_full_hosts_are_skipped_and_impossible_is_an_error() -> None:
    data = {"nodes": [{"name": "a", "hosts": [{"name": "small", "memory_mb": 1}, {"name": "big", "memory_mb": 10}]}]}
    t = parse_topology(data)
    plan = initial_placement(t, [0], 11, MIB)  # 1 + 10 slots, exactly enough
    assert len(plan["small"]) == 1
    assert len(plan["big"]) == 10
    with pytest.raises(PlacementError, match=r"cannot hold the model: 12 experts .* \(11 expert slots\)"):
        initial_placement(t, [0], 12, MIB)
    with pytest.raises(PlacementError, match="expert size"):
        host_slots(t.nodes[0].hosts[0], 0)


@settings(max_examples=60, deadline=None)
@given(
    memories=st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=3), min_size=1, max_size=4),
    num_layers=st.integers(1, 4),
    num_experts=st.integers(1, 8),
)
def test_placement_invariants(memories: list[list[int]], num_layers: int, num_experts: int) -> None:
    """Each expert exactly once, no host over budget, host loads differ by at most one when
    memory does not bind — or a PlacementError exactly when the slots are too few."""
    data = {
        "nodes": [
            {"name": f"n{i}", "hosts": [{"name": f"n{i}h{j}", "memory_mb": m + 0.5} for j, m in enumerate(hosts)]}
            for i, hosts in enumerate(memories)
        ]
    }
    t = parse_topology(data)
    slots = {h.name: host_slots(h, MIB) for _, h in t.hosts()}
    layers = list(range(0, 2 * num_layers, 2))  # MoE layers need not be contiguous
    need = num_layers * num_experts
    if sum(slots.values()) < need:
        with pytest.raises(PlacementError):
            initial_placement(t, layers, num_experts, MIB)
        return
    plan = initial_placement(t, layers, num_experts, MIB)
    placed = Counter(key for keys in plan.values() for key in keys)
    assert set(placed) == {(layer, e) for layer in layers for e in range(num_experts)}
    assert set(placed.values()) == {1}
    for host, keys in plan.items():
        assert len(keys) <= slots[host]
        assert keys == sorted(keys)
    if min(slots.values()) * len(slots) >= need:
        loads = [len(keys) for keys in plan.values()]
        assert max(loads) - min(loads) <= 1


PLACE_FORMAT = """
expert_mb = 0.5
[link_defaults]
rtt_ms = 8.0
rate_mbit = 100
[[nodes]]
name = "edge-a"
hosts = [{ slots = 4 }]
[[nodes]]
hosts = [{ memory_gb = 0.0029296875, speed = 2.0 }, { slots = 2 }]
"""


def test_the_place_command_format_loads_with_the_same_hosts_and_links(tmp_path: Path) -> None:
    """A `prism place` topology file gives the same slots, speeds and node round trips here."""
    import numpy as np

    from services.placement.topology import load_topology as load_place_topology
    from shared.topology import pairwise_links

    path = tmp_path / "place.toml"
    path.write_text(PLACE_FORMAT)
    cluster, names = load_place_topology(path)
    topology = load_topology(path)
    assert [n.name for n in topology.nodes] == names == ["edge-a", "node1"]
    expert_bytes = MIB // 2  # expert_mb of the file
    hosts = [h for _, h in topology.hosts()]
    assert [host_slots(h, expert_bytes) for h in hosts] == cluster.host_slots.tolist() == [4, 6, 2]
    assert [h.speed for h in hosts] == cluster.host_speed.tolist()
    assert [h.name for h in hosts] == ["edge-a-h0", "node1-h0", "node1-h1"]
    rtt, rate = pairwise_links(topology)
    np.testing.assert_allclose(np.array(rtt), cluster.rtt_s)
    np.testing.assert_allclose(np.array(rate), cluster.bandwidth_Bps)
    assert topology.nodes[0].link.delay_ms == 2.0  # one way to the hub: a quarter of the node round trip


def test_place_format_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match=r"per-pair \[\[links\]\] cannot be emulated"):
        parse_topology({"links": [{"nodes": [0, 1]}], "nodes": [{"hosts": [{"slots": 1}]}] * 2}, "p.toml")
    with pytest.raises(TopologyError, match="unknown keys"):
        parse_topology({"expert_mb": 1, "nodez": []}, "p.toml")
    with pytest.raises(TopologyError, match=r"hosts\[0\] accepts"):
        parse_topology({"expert_mb": 1, "nodes": [{"hosts": [{"slots": 1, "gpu": 1}]}]}, "p.toml")


def test_slots_cap_what_memory_allows() -> None:
    t = parse_topology({"nodes": [{"name": "a", "hosts": [
        {"name": "h0", "slots": 3}, {"name": "h1", "slots": 9, "memory_mb": 2}, {"name": "h2", "memory_mb": 2}]}]})
    h0, h1, h2 = t.nodes[0].hosts
    assert [host_slots(h, MIB) for h in (h0, h1, h2)] == [3, 2, 2]
    assert h0.memory_limit_mb(MIB) == 4.0  # room for its 3 slots plus 1 MiB
    assert h1.memory_limit_mb(MIB) == 2.0
    with pytest.raises(TopologyError, match="needs memory_mb"):
        parse_topology({"nodes": [{"name": "a", "hosts": [{"name": "h0"}]}]})


def test_the_placement_service_plans_with_each_nodes_own_link(monkeypatch: pytest.MonkeyPatch) -> None:
    """`prism up` hands the placement service each node's link (PRISM_PLACEMENT_LINKS): its cluster has
    the topology's node round trips, not the slowest pair's for every pair; a node the links leave out
    gets the uniform rtt_ms."""
    import numpy as np

    from cli.control_plane import control_plane_env
    from cli.stack_plan import StackOptions
    from services.placement.planner import cluster_view
    from services.placement.settings import PlacementSettings
    from shared.schemas import HostStatus
    from shared.topology import pairwise_links

    topology = parse_topology({"nodes": [
        {"name": "near", "hosts": [{"name": "near-h", "slots": 4}], "link": {"delay_ms": 0.5, "rate_mbit": 1000}},
        {"name": "mid", "hosts": [{"name": "mid-h", "slots": 4}], "link": {"delay_ms": 1.0}},
        {"name": "far", "hosts": [{"name": "far-h", "slots": 4}], "link": {"delay_ms": 5.0, "rate_mbit": 100}},
    ]})
    env, _ = control_plane_env(StackOptions(topology=topology, model=Path("m"), run_dir=Path("r")))
    for name, value in env.items():  # read as the service reads them
        monkeypatch.setenv(name, value)
    settings = PlacementSettings()
    statuses = [HostStatus(host=f"{n}-h", node=n, device="cpu", memory_used_bytes=0, memory_limit_bytes=4,
                           experts=[], queue_depth=0, calls_served=0, tokens_served=0, errors=0)
                for n in ("near", "mid", "far")]
    cluster = cluster_view(statuses, settings.node_list(), 1, settings.node_links()).cluster
    rtt, rate = pairwise_links(topology)
    np.testing.assert_allclose(cluster.rtt_s, rtt)
    np.testing.assert_allclose(cluster.bandwidth_Bps, rate)
    assert cluster.rtt_s[0, 1] == pytest.approx(0.003)
    assert cluster.rtt_s[0, 2] == pytest.approx(0.011)
    partial = PlacementSettings(nodes="near,mid,far", links=settings.links[:2], rtt_ms=8.0, bandwidth_mbit=200.0)
    links = partial.node_links()
    assert links["far"].delay_ms == 2.0  # far to another such node: 8 ms
    assert links["far"].rate_mbit == 200.0
    assert links["near"] == topology.nodes[0].link
