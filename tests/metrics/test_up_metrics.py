"""`prism up` end to end: the prometheus.yml it writes lists every service's /metrics, each target
answers a scrape that prometheus_client's parser reads, and a request moves the node's counters by
its usage. Also the compose scrape config and the Grafana dashboard against the metric definitions."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import nats
import yaml

from shared import subjects
from shared.metrics import SPECS
from tests.checkpoints import make_tiny_checkpoint
from tests.launcher.test_up import prism_up, wait_for_line
from tests.metrics.scrape import Scrape, scrape

REPO = Path(__file__).resolve().parents[2]
JOBS = {"gating": "prism_gating", "host": "prism_expert_host", "placement": "prism_placement",
        "migrator": "prism_migrator", "api": "prism_api"}


def targets(config: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """service label → (job, "host:port") of a scrape config."""
    out = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            (address,) = static["targets"]
            out[static["labels"]["service"]] = (job["job_name"], address)
    return out


async def scrape_all(found: dict[str, tuple[str, str]]) -> dict[str, Scrape]:
    return {name: await scrape(int(address.rsplit(":", 1)[1])) for name, (_, address) in found.items()}


async def check_stack(url: str, found: dict[str, tuple[str, str]], hosts: list[str]) -> None:
    before = await scrape_all(found)
    nc = await nats.connect(url)
    try:
        body = json.dumps({"input_ids": [5, 6, 7], "max_tokens": 4}).encode()
        reply = json.loads((await nc.request(subjects.infer("node0"), body, timeout=60)).data)
    finally:
        await nc.close()
    after = await scrape_all(found)
    gating = after["gating-node0"]
    for kind, used in (("prompt", reply["usage"]["prompt_tokens"]), ("generated", reply["usage"]["completion_tokens"])):
        moved = gating.total("prism_tokens_total", kind=kind) - before["gating-node0"].total("prism_tokens_total",
                                                                                             kind=kind)
        assert moved == used, kind
    assert gating.total("prism_expert_calls_total") > before["gating-node0"].total("prism_expert_calls_total")
    for host in hosts:  # from its own /metrics, or its gating's where it is embedded
        used = [m.value("prism_host_memory_bytes", host=host, kind="used") for m in after.values()
                if host in m.label_values("prism_host_memory_bytes", "host")]
        assert len(used) == 1, host
        assert used[0] > 0, host
    assert after["placement"].value("prism_plan_epoch", stage="published") >= 1
    assert after["migrator"].value("prism_plan_epoch", stage="applied") >= 1


async def until_scraped(address: str) -> None:
    """Until the restarted process serves metrics and has talked over NATS again (it may
    serve /metrics before its connection is up, so the first answers can say 0 bytes)."""
    async with asyncio.timeout(60):
        while True:
            try:
                m = await scrape(int(address.rsplit(":", 1)[1]))
                if m.total("prism_network_bytes_total", direction="out") > 0:
                    return
            except OSError:  # the restarted process is still loading its model or experts
                pass
            await asyncio.sleep(0.2)


def test_prism_up_writes_a_scrape_config_whose_every_target_answers(tmp_path: Path) -> None:
    model = make_tiny_checkpoint("qwen2_moe", tmp_path / "model")
    run_dir = tmp_path / "run"
    with prism_up("--nodes", "2", "--hosts-per-node", "1", "--model", str(model), run_dir=run_dir) as (process, url):
        manifest = json.loads((run_dir / "stack.json").read_text())
        config_path = Path(manifest["prometheus_config"])
        assert config_path == run_dir / "prometheus.yml"
        found = targets(yaml.safe_load(config_path.read_text()))
        services = set(manifest["pids"]) - {"hub", "leaf-node0", "leaf-node1"}
        assert set(found) == set(manifest["metrics"]) == services
        for name, (job, address) in found.items():
            assert job == JOBS[name.split("-")[0]], name
            assert address.startswith("127.0.0.1:"), name
            assert manifest["metrics"][name] == f"http://{address}/metrics"
        asyncio.run(check_stack(url, found, sorted(manifest["placement"])))
        # a restarted child serves its metrics where the config says (a host process where there is one)
        victim = next((name for name in sorted(found) if name.startswith("host-")), "gating-node1")
        os.kill(manifest["pids"][victim], signal.SIGKILL)
        wait_for_line(process, f"{victim} restarted", 60, stream="stderr")
        asyncio.run(until_scraped(found[victim][1]))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_the_compose_scrape_config_lists_every_python_service_at_its_metrics_port() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    want = {}
    for name, service in compose["services"].items():
        if service.get("command", [])[:2] == ["python", "-m"]:
            env = service["environment"]
            port = next(v for k, v in env.items() if k.endswith("_METRICS_PORT"))
            want[name] = (f"prism_{service['command'][2].rsplit('.', 1)[-1]}", f"{name}:{port}")
            published = [p.rsplit(":", 1)[-1] for p in service.get("ports", [])]
            assert port not in published, name  # metrics stay on the compose network
    assert targets(yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())) == want


def test_the_grafana_dashboard_charts_the_metrics_that_exist() -> None:
    dashboard = json.loads((REPO / "docker" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bprism_[a-z_]+", expr)}
    defined = {spec.name for spec in SPECS}
    series = defined | {f"{s.name}_{part}" for s in SPECS if s.kind == "histogram" for part in ("bucket", "sum",
                                                                                                  "count")}
    assert used <= series, sorted(used - series)
    charted = {name.removesuffix("_bucket") for name in used}
    assert defined - charted == set(), f"not on the dashboard: {sorted(defined - charted)}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))

