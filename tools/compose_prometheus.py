"""Write docker/prometheus.yml from docker-compose.yml: every Python service's /metrics on the compose
network (its METRICS_PORT), one job per kind of service (the same layout `prism up` writes).
tests/metrics/test_up_metrics.py checks the file against the compose file; rerun this after changing
the compose services.

    .venv/bin/python tools/compose_prometheus.py     (needs pyyaml, a test dependency)
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.stack_plan import prometheus_config  # noqa: E402

HEADER = """\
# docker compose: every Python service's /metrics on the compose network (see docker-compose.yml).
# Written by tools/compose_prometheus.py; tests/metrics/test_up_metrics.py checks it against compose.
"""


def main() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    targets = {}
    for name, service in compose["services"].items():
        command = service.get("command", [])
        if command[:2] == ["python", "-m"]:
            port = next(v for k, v in service["environment"].items() if k.endswith("_METRICS_PORT"))
            targets[name] = (command[2], f"{name}:{port}")
    out = ROOT / "docker" / "prometheus.yml"
    out.write_text(HEADER + prometheus_config(targets))
    print(f"{out.relative_to(ROOT)}: {len(targets)} targets")


if __name__ == "__main__":
    main()
