"""A service started with a bad setting, a mistyped variable or experts its model lacks says so in one
line and exits non-zero (it used to print a pydantic or residency traceback, or ignore the variable)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.nats_server import NatsServer


def start(module: str, env: dict[str, str], repo_root: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PRISM_")}
    return subprocess.run([sys.executable, "-m", module], check=False, env={**clean, **env}, cwd=repo_root,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("module", "env", "code", "message"),
    [
        ("services.gating", {"PRISM_GATING_MAX_BATCH": "0"},
         2, "gating: error: max_batch: Input should be greater than or equal to 1"),
        ("services.gating", {"PRISM_GATING_MAX_BACTH": "4"},
         2, "gating: error: PRISM_GATING_MAX_BACTH: no such setting (see python -m services.gating --help)"),
        ("services.placement", {"PRISM_PLACEMENT_POLICY": "best"}, 2, "placement: error: policy: Input should be"),
        ("services.gating", {"PRISM_GATING_LINKS": "edge-a=2"},
         2, 'gating: error: error parsing value for field "links"'),
        ("services.placement", {"PRISM_PLACEMENT_LINKS": '[{"node": "a", "delay_ms": -1}]'},
         2, "placement: error: links.0.delay_ms: Input should be greater than or equal to 0"),
        ("services.placement", {"PRISM_PLACEMENT_NODES": "a,b",
                                "PRISM_PLACEMENT_LINKS": '[{"node": "b"}, {"node": "a"}]'},
         2, "placement: error: links: must list their nodes in the order of `nodes` (a,b)"),
        ("services.placement", {"PRISM_PLACEMENT_MAX_PAYLOAD_BYTES": "65536",
                                "PRISM_PLACEMENT_LINK_RATE_BYTES": "65536"},
         2, "placement: error: link_rate_bytes: must fit in one message: at most max_payload_bytes - 4096 (61440)"),
        ("services.expert_host", {"PRISM_HOST_EXPERTS": "1-3:0-7,5:*"},
         1, "expert_host: error: layer 5 does not exist; the model has layers 0..3"),
    ],
)
def test_bad_settings_are_one_line(module: str, env: dict[str, str], code: int, message: str, repo_root: Path) -> None:
    done = start(module, env, repo_root)
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().startswith(message), done.stderr
    assert "Traceback" not in done.stderr


async def test_a_clean_stop_logs_no_disconnect_warning(nats_hub: NatsServer) -> None:
    """Every service drains its connection on SIGTERM; that disconnect is no warning (it made 7 warning
    lines at every `prism up` stop, drowning real ones)."""
    from structlog.testing import capture_logs

    from services.gating.settings import GatingSettings
    from shared.runtime import connect

    settings = GatingSettings(nats_url=nats_hub.cfg.client_url())
    with capture_logs() as logs:
        nc = await connect(settings, "stopping")
        await nc.drain()
    assert [(e["event"], e["log_level"]) for e in logs] == [("nats_disconnected", "info")]
