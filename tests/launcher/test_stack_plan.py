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
