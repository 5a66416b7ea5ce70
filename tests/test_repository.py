"""Properties of the repository itself: pure logic stays free of NATS, git holds no generated files."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Modules that talk to NATS: services' service.py files, the runtime, the weights store, the API's gateway, the
# gating's bus side of routes, the CLI.
NATS_ALLOWED = {"shared/runtime.py", "shared/weights.py", "shared/nats_server.py", "services/api/gateway.py",
                "services/gating/hops.py"}
PURE_PACKAGES = ["shared", "services"]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def pure_modules() -> list[Path]:
    files = [p for pkg in PURE_PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return [
        p
        for p in files
        if p.name not in {"service.py", "dispatch.py", "__main__.py"}
        and str(p.relative_to(ROOT)) not in NATS_ALLOWED
    ]


@pytest.mark.parametrize("path", pure_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_logic_does_not_import_nats(path: Path) -> None:
    assert not {name for name in imports_of(path) if name == "nats" or name.startswith("nats.")}


# The layers, lowest first: a module may import its own layer and those below, never one above.
LAYERS = {"shared": 0, "services": 1, "cli": 2}


@pytest.mark.parametrize("path", [p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_layers(path: Path) -> None:
    """shared/ is what every service imports, so it imports no service; services import no CLI."""
    own = LAYERS[path.relative_to(ROOT).parts[0]]
    above = {name for name in imports_of(path) if LAYERS.get(name.split(".")[0], -1) > own}
    assert not above


def test_git_holds_no_generated_or_large_files() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    generated = [f for f in files if any(part in f for part in ("__pycache__", ".venv/", ".egg-info", "/var/"))]
    assert not generated
    large = [f for f in files if (ROOT / f).exists() and (ROOT / f).stat().st_size > 2_000_000]
    assert set(large) <= {"models/demo/model.safetensors"}, large
    assert sum((ROOT / f).stat().st_size for f in large) <= 50 * 2**20


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "./run-tests" in readme
    assert "./prism demo" in readme
    assert "./run-tests" in (ROOT / ".ci" / "run").read_text()


def test_cli_policy_choices_match_the_registry() -> None:
    from typing import get_args

    from cli.sim import ALL_POLICIES
    from cli.up import POLICY_NAMES
    from services.placement.types import PolicyName

    assert set(POLICY_NAMES) == set(get_args(PolicyName))
    assert set(ALL_POLICIES.split(",")) == set(get_args(PolicyName))


def test_the_readme_names_every_setting_of_every_service() -> None:
    from pydantic_settings import BaseSettings

    from services.api.settings import ApiSettings
    from services.expert_host.settings import ExpertHostSettings
    from services.gating.settings import GatingSettings
    from services.migrator.settings import MigratorSettings
    from services.placement.settings import PlacementSettings

    section = (ROOT / "README.md").read_text().split("## Configuration")[1].split("\n## ")[0]
    rows = {line.split("|")[2].strip(" `"): line for line in section.splitlines() if line.startswith("| ")}
    shared = rows.pop("same prefixes")  # the fields every service has
    settings: list[type[BaseSettings]] = [GatingSettings, ExpertHostSettings, PlacementSettings, MigratorSettings,
                                          ApiSettings]
    for cls in settings:
        row = rows[str(cls.model_config["env_prefix"])]
        missing = [name.upper() for name in cls.model_fields if f"`{name.upper()}`" not in row + shared]
        assert not missing, f"{cls.__name__}: README's configuration table does not name {missing}"
