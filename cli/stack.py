"""LocalStack: one machine, everything Prism needs, started and stopped as one unit (`prism up`).

On 127.0.0.1: a hub `nats-server` (JetStream with domain `hub`, MQTT listener, monitoring, leaf
port), one leaf `nats-server` per node whose connection to the hub goes through a link emulator
when the node's link has a delay or a rate, and the services of `cli.stack_plan.plan_stack` as child
processes (`python -m services.<name>`, configured by environment variables only). The hosts start
with `shared.topology.initial_placement`, written as epoch 1 of the plan; the placement service and
the migrator run on the hub and move experts when the nodes' activation statistics justify it.

Three parts: the plan (cli/stack_plan.py, pure), the supervisor (cli/supervisor.py: restart, stop in
order: services, leaves, links, hub) and the readiness checks (cli/readiness.py). Each child writes
its log to `<run_dir>/<name>.log` and serves Prometheus /metrics on a free loopback port of its own
(kept over restarts; `<run_dir>/prometheus.yml` scrapes them all, `stack.json` lists them).
`start()` either returns with every node answering a one-token request and every host reporting its
experts, or stops what it started and raises StackError with one line saying what went wrong. While
serving, `supervise()` restarts a child that dies.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cli.control_plane import write_initial_plan
from cli.readiness import wait_ready
from cli.stack_plan import (
    StackError,
    StackOptions,
    StackPlan,
    ignored_env,
    plan_stack,
    prometheus_config,
    service_env,
)
from cli.supervisor import Supervisor
from shared.linkemu import LinkEmulator
from shared.nats_server import (
    LeafRemote,
    NatsServer,
    NatsServerError,
    ServerConfig,
    find_binary,
    free_port,
    port_is_free,
    reserve_ports,
)
from shared.process import Child

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["LocalStack", "StackError", "StackOptions"]


class LocalStack:
    """`async with LocalStack(options) as stack:` runs everything; see the module docstring."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.run_dir = options.run_dir.absolute()  # handed to children, which start in REPO_ROOT
        reserve_ports(options.port, options.mqtt_port, options.http_port, options.api_port)
        self.port = options.port or free_port()
        self.hub_url = f"nats://127.0.0.1:{self.port}"
        self.leaf_urls: dict[str, str] = {}
        self.links: dict[str, LinkEmulator] = {}
        self.plan: StackPlan | None = None
        self.supervisor = Supervisor(self.hub_url, options.stop_timeout_s)
        self.ignored_env: set[str] = set()  # PRISM_* variables of the environment the launcher overrides
        self.metrics_ports: dict[str, int] = {}  # service → its /metrics port on 127.0.0.1 (kept over restarts)

    @property
    def placement(self) -> dict[str, list[tuple[int, int]]]:
        return self.plan.placement if self.plan else {}

    @property
    def prometheus_config(self) -> Path:
        """`<run_dir>/prometheus.yml`: a scrape config of every service's /metrics."""
        return self.run_dir / "prometheus.yml"

    @property
    def api_url(self) -> str:
        """The HTTP API's base URL (without /v1), as a client on this machine reaches it."""
        return f"http://127.0.0.1:{self.options.api_port}"

    @property
    def max_payload(self) -> int:
        return self.plan.max_payload if self.plan else 0

    # ---- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything and wait until it serves; on any failure stop what started and raise."""
        try:
            plan = self.prepare()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            targets = {spec.name: (spec.module, f"127.0.0.1:{self.metrics_ports[spec.name]}") for spec in plan.services}
            self.prometheus_config.write_text(prometheus_config(targets))
            await self._start_hub(plan)
            await write_initial_plan(self.hub_url, plan.model_name, plan.placement, plan.routes)
            await asyncio.gather(*(self._start_leaf(node.name, plan) for node in self.options.topology.nodes))
            self.supervisor.services = [self.service(spec.name) for spec in plan.services]
            await asyncio.gather(*(child.start() for child in self.supervisor.services))
            self._write_manifest(ready=False)
            await wait_ready(self.hub_url, self.options.topology, plan.placement, watch=self.supervisor.children,
                             timeout_s=self.options.ready_timeout_s, run_dir=self.run_dir,
                             api_port=self.options.api_port)
            self._write_manifest(ready=True)
        except NatsServerError as exc:
            await self.stop()
            raise StackError(str(exc)) from None
        except BaseException:
            await self.stop()
            raise

    def prepare(self) -> StackPlan:
        """What can fail before anything starts (model, placement, ports, binary): StackError."""
        if self.plan is None:
            self.plan = plan_stack(self.options, os.environ, os.cpu_count() or 1)
            self.metrics_ports = {spec.name: free_port() for spec in self.plan.services}
        opts = self.options
        named = {"--port (hub clients)": self.port, "--mqtt-port": opts.mqtt_port, "--monitor-port": opts.http_port,
                 "--api-port": opts.api_port}
        for what, port in named.items():
            if port and not port_is_free(port):
                raise StackError(f"port 127.0.0.1:{port} ({what}) is already in use; choose another or stop its user")
        try:
            find_binary()
        except NatsServerError as exc:
            raise StackError(str(exc)) from None
        return self.plan

    async def _start_server(self, cfg: ServerConfig) -> None:
        server = NatsServer(cfg, self.run_dir, cwd=REPO_ROOT)
        self.supervisor.servers.append(server)
        await server.start()

    async def _start_hub(self, plan: StackPlan) -> None:
        opts = self.options
        await self._start_server(ServerConfig(
            name="hub",
            port=self.port,
            http_port=opts.http_port or None,
            store_dir=self.run_dir / "jetstream",
            domain="hub",
            mqtt_port=opts.mqtt_port or None,
            leaf_port=free_port(),
            max_payload=plan.max_payload,
        ))

    async def _start_leaf(self, node: str, plan: StackPlan) -> None:
        shape = self.options.topology.node(node).link.shape()
        hub_port = self.supervisor.servers[0].cfg.leaf_port
        assert hub_port is not None
        if not shape.is_ideal:
            link = LinkEmulator("127.0.0.1", hub_port, shape)
            await link.start()
            self.links[node] = link
            hub_port = link.port
        cfg = ServerConfig(
            name=f"leaf-{node}",
            port=free_port(),
            leaf_remotes=(LeafRemote(f"nats://127.0.0.1:{hub_port}"),),
            max_payload=plan.max_payload,
        )
        self.leaf_urls[node] = cfg.client_url()
        await self._start_server(cfg)

    def service(self, name: str) -> Child:
        """The child process of the plan's service `name`. Its settings are the environment's
        (PRISM_GATING_MAX_BATCH=4 prism up works), except those the launcher sets (see `ignored_env`)."""
        if self.plan is None:
            raise StackError("prepare() the stack before building its services")
        spec = next(spec for spec in self.plan.services if spec.name == name)
        url = self.leaf_urls[spec.node] if spec.node else self.hub_url
        port = self.metrics_ports[name]
        self.ignored_env |= ignored_env(spec, url, os.environ, metrics_port=port)
        env = service_env(spec, url, os.environ, str(REPO_ROOT), metrics_port=port)
        return Child(name, [sys.executable, "-m", spec.module], self.run_dir / f"{name}.log", env, cwd=REPO_ROOT)

    # ---- serving and stopping -------------------------------------------------------------------

    async def supervise(self, report: Callable[[str], None], poll_s: float = 0.5) -> None:
        """Restart every child that exits while serving, until cancelled (see cli/supervisor.py)."""
        await self.supervisor.supervise(report, lambda: self._write_manifest(ready=True), poll_s)

    async def stop(self) -> None:
        async def stop_links() -> None:
            for link in self.links.values():
                await link.stop()

        await self.supervisor.stop(stop_links)

    async def __aenter__(self) -> LocalStack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _write_manifest(self, *, ready: bool) -> None:
        """`<run_dir>/stack.json`: URLs, pids and placement, for tools and tests (rewritten when ready)."""
        data = {
            "ready": ready,
            "hub_url": self.hub_url,
            "leaf_urls": self.leaf_urls,
            "pids": {c.name: c.pid if c.returncode is None else None for c in self.supervisor.children()},
            "placement": {host: [list(k) for k in keys] for host, keys in self.placement.items()},
            "max_payload": self.max_payload,
            "metrics": {name: f"http://127.0.0.1:{port}/metrics" for name, port in self.metrics_ports.items()},
            "prometheus_config": str(self.prometheus_config),
            "api_url": self.api_url if self.options.api_port else None,
        }
        (self.run_dir / "stack.json").write_text(json.dumps(data, indent=2) + "\n")
