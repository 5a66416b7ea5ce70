"""What `prism up` decides from the machine it runs on (cli.stack_plan), without starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.stack_plan import StackOptions, plan_stack
from shared.topology import simple_topology

REPO = Path(__file__).resolve().parents[2]


def gating_threads(nodes: int, cores: int, environ: dict[str, str] | None = None) -> set[str]:
    topology = simple_topology(nodes=nodes, hosts_per_node=1, memory_mb=64)
    options = StackOptions(topology=topology, model=REPO / "models" / "demo", run_dir=REPO / "var")
    plan = plan_stack(options, environ=environ or {}, cores=cores)
    return {spec.settings["PRISM_GATING_COMPUTE_THREADS"] for spec in plan.services if spec.module == "services.gating"}


@pytest.mark.parametrize(("nodes", "cores", "threads"), [(1, 2, "2"), (1, 16, "16"), (2, 16, "8"), (3, 2, "1")])
def test_each_gating_gets_its_share_of_the_cores(nodes: int, cores: int, threads: str) -> None:
    assert gating_threads(nodes, cores) == {threads}


def test_the_environment_sets_the_gatings_threads() -> None:
    assert gating_threads(2, 16, {"PRISM_GATING_COMPUTE_THREADS": "3"}) == {"3"}


def test_every_host_gets_its_topology_speed() -> None:
    """What the placement service plans a heterogeneous cluster with (hosts report it in heartbeats)."""
    import json

    from shared.topology import load_topology

    topology = load_topology(REPO / "topologies" / "three-edge.toml")
    options = StackOptions(topology=topology, model=REPO / "models" / "demo", run_dir=REPO / "var")
    speeds = {}
    for spec in plan_stack(options, environ={}, cores=2).services:
        if spec.module == "services.expert_host":
            speeds[spec.settings["PRISM_HOST_HOST"]] = float(spec.settings["PRISM_HOST_SPEED"])
        if spec.module == "services.gating":
            speeds |= {h["host"]: h["speed"] for h in json.loads(spec.settings["PRISM_GATING_EMBEDDED_HOSTS"])}
    assert speeds == {host.name: host.speed for _, host in topology.hosts()}
    assert speeds["edge-b-gpu0"] == 0.7
