"""`prism place`'s topology loader reads `prism up` files (topologies/): hosts and nodes as in the
file, slots = floor(memory_mb MiB / one expert of the model at the file's dtype), node-to-node links
through the hub. Expected values are worked out here from the files and the model's config.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli import DEMO_MODEL
from services.placement.errors import InvalidInputError
from services.placement.topology import expert_bytes, load_topology
from shared.topology import is_placement_format

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
# One demo expert (gate, up, down) at float32: 3 × hidden 192 × moe intermediate 96 × 4 bytes.
DEMO_EXPERT_F32 = 3 * 192 * 96 * 4  # 221 184 B = 0.2109 MiB

# file → (node names, host → node, slots per host, speed per host, node rtt s, node bandwidth B/s)
BUNDLED = {
    # 11 MiB / 0.2109 MiB = 52.1 → 52 (the file's comment: 52 of 128 experts per host)
    "demo.toml": (["edge-a", "edge-b"], [0, 0, 1], [52] * 3, [1.0] * 3, 8e-3, 62.5e6),
    # 512 MiB → 2427.2; every delay 2 ms, so rtt = 2 × (2 + 2) ms; 500 Mbit/s = 62.5 MB/s
    "three-edge.toml": (["edge-a", "edge-b", "edge-c"], [0, 1, 2, 2], [2427] * 4, [1.0, 0.7, 1.0, 1.0], 8e-3, 62.5e6),
    # 8.1 MiB → 38.4 → 38 (30% of 128); every delay 1 ms, so rtt = 2 × (1 + 1) ms
    "testbed.toml": (["edge-a", "edge-b", "edge-c"], [0, 1, 2, 2], [38] * 4, [1.0] * 4, 4e-3, 62.5e6),
    # 1024 MiB → 4854.4; no links: an ideal hub
    "loopback.json": (["node0", "node1"], [0, 1], [4854] * 2, [1.0] * 2, 0.0, np.inf),
}


def test_demo_expert_size_follows_the_model_config() -> None:
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert 3 * config["hidden_size"] * config["intermediate_size"] * 4 == DEMO_EXPERT_F32
    assert expert_bytes(DEMO_MODEL, "float32") == DEMO_EXPERT_F32
    assert 11 * MIB // DEMO_EXPERT_F32 == 52


def test_every_bundled_topology_loads_with_the_expected_cluster() -> None:
    files = sorted(p.name for p in (ROOT / "topologies").iterdir())
    assert files == sorted(BUNDLED), "a topology file was added or removed: give its expected cluster here"
    for name, (nodes, host_node, slots, speed, rtt, rate) in BUNDLED.items():
        cluster, names = load_topology(ROOT / "topologies" / name, DEMO_MODEL)
        assert names == nodes, name
        assert cluster.host_node.tolist() == host_node, name
        assert cluster.host_slots.tolist() == slots, name
        assert cluster.host_speed.tolist() == speed, name
        off = ~np.eye(len(nodes), dtype=bool)
        np.testing.assert_allclose(cluster.rtt_s[off], rtt, err_msg=name)
        np.testing.assert_array_equal(cluster.bandwidth_Bps[off], rate, err_msg=name)
        assert (np.diag(cluster.rtt_s) == 0).all()
        assert np.isinf(np.diag(cluster.bandwidth_Bps)).all()


def test_links_go_through_the_hub_and_dtype_sizes_the_slots(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text("""
dtype = "bfloat16"
[[nodes]]
name = "a"
link = { delay_ms = 1.0, rate_mbit = 100 }
hosts = [{ name = "a0", memory_mb = 11 }]
[[nodes]]
name = "b"
link = { delay_ms = 3.0 }                      # no rate: unlimited
hosts = [{ name = "b0", memory_mb = 11, slots = 7 }, { name = "b1", slots = 5, speed = 2.0 }]
[[nodes]]
name = "c"                                     # no link: no delay, unlimited
hosts = [{ name = "c0", memory_mb = 1 }]
""")
    cluster, names = load_topology(path, DEMO_MODEL)
    assert names == ["a", "b", "c"]
    assert cluster.host_node.tolist() == [0, 1, 1, 2]
    # bfloat16 halves the expert: 11 MiB → 104, 1 MiB → 9; `slots` caps what memory allows
    assert cluster.host_slots.tolist() == [104, 7, 5, 9]
    assert cluster.host_speed.tolist() == [1.0, 1.0, 2.0, 1.0]
    ms = 1e-3
    np.testing.assert_allclose(cluster.rtt_s, [[0, 8 * ms, 2 * ms], [8 * ms, 0, 6 * ms], [2 * ms, 6 * ms, 0]])
    inf, slow = np.inf, 100e6 / 8  # a's 100 Mbit/s limits both of its pairs
    np.testing.assert_array_equal(cluster.bandwidth_Bps, [[inf, slow, slow], [slow, inf, inf], [slow, inf, inf]])


@pytest.mark.parametrize(
    ("doc", "placement"),
    [
        ({"dtype": "float32", "nodes": []}, False),
        ({"nodes": [{"name": "a", "link": {}, "hosts": [{"slots": 1}]}]}, False),
        ({"nodes": [{"hosts": [{"name": "h", "slots": 1}]}]}, False),
        ({"nodes": [{"hosts": [{"memory_mb": 1}]}]}, False),
        ({"nodes": [{"hosts": [{"slots": 1}, {"memory_gb": 1}]}]}, True),
        ({"expert_mb": 1, "link_defaults": {}, "nodes": [{"name": "a", "hosts": [{"slots": 1}]}]}, True),
        ({"nodes": "x"}, False),
        ([], False),
    ],
)
def test_format_is_told_by_its_keys(doc: object, placement: bool) -> None:
    assert is_placement_format(doc) is placement


def test_errors_name_the_problem(tmp_path: Path) -> None:
    demo = ROOT / "topologies" / "demo.toml"
    with pytest.raises(InvalidInputError, match="needs a model directory"):
        load_topology(demo)
    with pytest.raises(InvalidInputError, match=f"invalid model directory {tmp_path}: no config.json"):
        load_topology(demo, tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text('dtype = "float8"\n[[nodes]]\nname = "a"\nhosts = [{ name = "h", memory_mb = 1 }]\n')
    with pytest.raises(InvalidInputError, match="dtype"):
        load_topology(bad, DEMO_MODEL)
