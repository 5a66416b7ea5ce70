"""LocalStack: one machine, everything Prism needs, started and stopped as one unit (`prism up`).

On 127.0.0.1: a hub `nats-server` (JetStream with domain `hub`, MQTT listener, monitoring, leaf
port), one leaf `nats-server` per node whose connection to the hub goes through a link emulator
when the node's link has a delay or a rate, and per node a gating plus its expert hosts as child
processes (`python -m services.gating` / `services.expert_host`, configured by environment
variables only). The hosts start with `shared.topology.initial_placement`, written as epoch 1 of
the plan; the placement service (`services.placement`) and the migrator (`services.migrator`) run on
the hub and move experts when the nodes' activation statistics justify it.

Children run in their own session (a Ctrl-C on the terminal reaches only the launcher, which
stops them in order: services, leaves, links, hub) and, on Linux, get SIGTERM if the launcher dies.
Each writes its log to `<run_dir>/<name>.log`. `start()` either returns with every node answering
a one-token request and every host reporting its experts, or stops what it started and raises
StackError with one line saying what went wrong. While serving, `supervise()` restarts a child that
dies: an expert host with the experts it last reported, anything else as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from cli.client import InferError, PrismClient
from cli.control_plane import control_plane_env, read_plan, write_initial_plan
from shared import subjects
from shared.linkemu import LinkEmulator
from shared.nats_server import LeafRemote, NatsServerError, ServerConfig, find_binary, free_port, port_is_free
from shared.nats_server import render_config as render_nats_config
from shared.topology import DTYPE_BYTES, Topology, TopologyError, initial_placement

REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
MIN_PAYLOAD = 8 * MIB
MAX_PAYLOAD = 64 * MIB  # the services' max_payload_bytes bound (and NATS's hard limit)
RESTARTS_PER_MINUTE = 5  # a child that fails more often is left stopped (see LocalStack.supervise)


class StackError(RuntimeError):
    """The stack could not start (bad model, taken port, topology too small, a child failed)."""


@dataclass(frozen=True)
class StackOptions:
    """What `prism up` starts. Ports: `port` 0 picks a free one; 0 disables MQTT / monitoring."""

    topology: Topology
    model: Path
    run_dir: Path
    port: int = 4222
    mqtt_port: int = 1883
    http_port: int = 8222
    max_context: int = 1024
    expert_timeout_s: float = 2.0
    activation_interval_s: float = 2.0
    ready_timeout_s: float = 180.0
    stop_timeout_s: float = 10.0
    log_level: str = "info"
    policy: str = "prism"
    plan_interval_s: float = 10.0
    migration_cost_calls: float = 50.0
    min_window_tokens: int = 256


def max_payload_for(hidden_size: int, max_context: int) -> int:
    """Server max_payload (bytes): a whole prompt's fp32 hidden states to one expert, twice over
    for headers and envelope, at least 8 MiB, at most 64 MiB (dispatch splits larger batches)."""
    return min(MAX_PAYLOAD, max(MIN_PAYLOAD, 2 * max_context * hidden_size * 4))


class Child:
    """One child process with its log file; `stop()` sends SIGTERM, then SIGKILL after a bound."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO_ROOT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    def failure(self) -> str | None:
        """'<name> exited with code N: <last log line> (log: <path>)' once it has exited."""
        if self.returncode is None:
            return None
        return f"{self.name} exited with code {self.returncode}: {_last_line(self.log_path)} (log: {self.log_path})"

    async def stop(self, timeout_s: float) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout_s):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Linux: ask the kernel to SIGTERM this child when the launcher dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][-300:] if lines else "(empty log)"


class LocalStack:
    """`async with LocalStack(options) as stack:` runs everything; see the module docstring."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.run_dir = options.run_dir.absolute()  # handed to children, which start in REPO_ROOT
        self.port = options.port or free_port()
        self.hub_url = f"nats://127.0.0.1:{self.port}"
        self.leaf_urls: dict[str, str] = {}
        self.placement: dict[str, list[tuple[int, int]]] = {}
        self.servers: list[Child] = []
        self.services: list[Child] = []
        self.links: dict[str, LinkEmulator] = {}
        self.max_payload = MIN_PAYLOAD
        self.hub_leaf_port = 0
        self._expert_bytes = 0
        self.model_name = ""
        self.ignored_env: set[str] = set()  # PRISM_* variables of the environment the launcher overrides
        self.given_up: set[str] = set()  # children that kept failing: not restarted again

    # ---- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start everything and wait until it serves; on any failure stop what started and raise."""
        try:
            self.prepare()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            await self._start_hub()
            await self._write_initial_plan()
            await asyncio.gather(*(self._start_leaf(node.name) for node in self.options.topology.nodes))
            await self._start_services()
            self._write_manifest(ready=False)
            await self.wait_ready()
            self._write_manifest(ready=True)
        except BaseException:
            await self.stop()
            raise

    def prepare(self) -> None:
        """What can fail before anything starts (model, placement, ports, binary): StackError."""
        self._plan()
        self._check_ports()

    def _plan(self) -> None:
        from shared.model.checkpoint import load_config
        from shared.model.config import list_moe_layers
        from shared.model.errors import ModelError

        opts = self.options
        try:
            config = load_config(opts.model)
        except ModelError as exc:
            raise StackError(f"invalid model directory {opts.model}: {exc}") from None
        self._expert_bytes = config.expert_nbytes(DTYPE_BYTES[opts.topology.dtype])
        try:
            self.placement = initial_placement(
                opts.topology, list_moe_layers(config), config.num_experts, self._expert_bytes
            )
        except TopologyError as exc:
            raise StackError(str(exc)) from None
        self.max_payload = max_payload_for(config.hidden_size, opts.max_context)
        self.model_name = opts.model.resolve().name

    def _check_ports(self) -> None:
        opts = self.options
        named = {"--port (hub clients)": self.port, "--mqtt-port": opts.mqtt_port, "--http-port": opts.http_port}
        for what, port in named.items():
            if port and not port_is_free(port):
                raise StackError(f"port 127.0.0.1:{port} ({what}) is already in use; choose another or stop its user")
        try:
            find_binary()
        except NatsServerError as exc:
            raise StackError(str(exc)) from None

    async def _start_server(self, cfg: ServerConfig) -> None:
        conf = self.run_dir / f"{cfg.name}.conf"
        conf.write_text(render_nats_config(cfg))
        child = Child(cfg.name, [str(find_binary()), "-c", str(conf)], self.run_dir / f"{cfg.name}.log")
        self.servers.append(child)
        await child.start()
        for port in (cfg.port, cfg.mqtt_port, cfg.leaf_port):
            if port is not None:
                await self._until_ready(f"{cfg.name} on port {port}", [child], functools.partial(_accepts, port), 15)

    async def _start_hub(self) -> None:
        opts = self.options
        self.hub_leaf_port = free_port()
        await self._start_server(
            ServerConfig(
                name="hub",
                port=self.port,
                http_port=opts.http_port or None,
                store_dir=self.run_dir / "jetstream",
                domain="hub",
                mqtt_port=opts.mqtt_port or None,
                leaf_port=self.hub_leaf_port,
                max_payload=self.max_payload,
            )
        )

    async def _start_leaf(self, node: str) -> None:
        shape = self.options.topology.node(node).link.shape()
        hub_port = self.hub_leaf_port
        if not shape.is_ideal:
            link = LinkEmulator("127.0.0.1", hub_port, shape)
            await link.start()
            self.links[node] = link
            hub_port = link.port
        cfg = ServerConfig(
            name=f"leaf-{node}",
            port=free_port(),
            leaf_remotes=(LeafRemote(f"nats://127.0.0.1:{hub_port}"),),
            max_payload=self.max_payload,
        )
        self.leaf_urls[node] = cfg.client_url()
        await self._start_server(cfg)

    async def _start_services(self) -> None:
        opts = self.options
        hosts = list(opts.topology.hosts())
        # A host busy-polls after a batch only where every host and gating can have a core of its own:
        # on fewer cores the spinning takes CPU from the others (bench/serving.py measures both).
        spare_cores = (os.cpu_count() or 1) > len(hosts) + len(opts.topology.nodes)
        busy_poll_s = os.environ.get("PRISM_HOST_BUSY_POLL_S", "0.002" if spare_cores else "0")
        for node, host in hosts:
            env = {
                "PRISM_HOST_HOST": host.name,
                "PRISM_HOST_NODE": node.name,
                "PRISM_HOST_EXPERTS": _format_experts(self.placement[host.name]),
                "PRISM_HOST_MEMORY_LIMIT_MB": f"{host.memory_limit_mb(self._expert_bytes):.6f}",
                "PRISM_HOST_DEVICE": host.device,
                "PRISM_HOST_DTYPE": opts.topology.dtype,
                "PRISM_HOST_BUSY_POLL_S": busy_poll_s,
            }
            child = self._service(f"host-{host.name}", "services.expert_host", "PRISM_HOST_", node.name, env)
            self.services.append(child)
        for node in opts.topology.nodes:
            env = {
                "PRISM_GATING_NODE": node.name,
                "PRISM_GATING_DTYPE": opts.topology.dtype,  # hosts refuse hidden states of another dtype
                "PRISM_GATING_MAX_CONTEXT": str(opts.max_context),
                "PRISM_GATING_EXPERT_TIMEOUT_S": str(opts.expert_timeout_s),
                "PRISM_GATING_ACTIVATION_INTERVAL_S": str(opts.activation_interval_s),
            }
            child = self._service(f"gating-{node.name}", "services.gating", "PRISM_GATING_", node.name, env)
            self.services.append(child)
        self.services.extend(self._control_plane())
        await asyncio.gather(*(child.start() for child in self.services))

    def _control_plane(self) -> list[Child]:
        """The placement service and the migrator, on the hub (KV writes from a leaf get "no responders")."""
        placement, migrator = control_plane_env(self.options)
        return [
            self._service("placement", "services.placement", "PRISM_PLACEMENT_", None, placement),
            self._service("migrator", "services.migrator", "PRISM_MIGRATOR_", None, migrator),
        ]

    async def _write_initial_plan(self) -> None:
        await write_initial_plan(self.hub_url, self.model_name, self.placement)

    def _service(self, name: str, module: str, prefix: str, node: str | None, own: dict[str, str]) -> Child:
        """A service's child process. Its settings are the environment's (PRISM_GATING_MAX_BATCH=4 prism up
        works), except those that wire the stack together, which the launcher sets (see `ignored_env`)."""
        wiring = {
            f"{prefix}MODEL": str(self.options.model.resolve()),
            f"{prefix}NATS_URL": self.leaf_urls[node] if node else self.hub_url,
            f"{prefix}MAX_PAYLOAD_BYTES": str(self.max_payload),
            f"{prefix}LOG_FORMAT": "json",
            **own,
        }
        self.ignored_env |= {key for key, value in wiring.items() if _overridden(key, value)}
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            f"{prefix}LOG_LEVEL": os.environ.get(f"{prefix}LOG_LEVEL", self.options.log_level),
            **wiring,
        }
        return Child(name, [sys.executable, "-m", module], self.run_dir / f"{name}.log", env)

    # ---- readiness ------------------------------------------------------------------------------

    async def wait_ready(self) -> None:
        """Every host answers `status` with its experts, the migrator and the placement service answer
        a micro PING, and every node answers a one-token request."""
        client = await PrismClient.connect(self.hub_url)
        try:
            for node, host in self.options.topology.hosts():
                want = len(self.placement[host.name])
                probe = functools.partial(self._host_ready, client, host.name, want)
                await self._until_ready(f"host {host.name} of {node.name}", self._all(), probe)
            for service in (subjects.SERVICE_MIGRATOR, subjects.SERVICE_PLACEMENT):  # weights up, statistics on
                probe = functools.partial(_service_answers, client, service)
                await self._until_ready(service, self._all(), probe)
            for node in self.options.topology.nodes:
                probe = functools.partial(_node_ready, client, node.name)
                await self._until_ready(f"gating of {node.name}", self._all(), probe)
        finally:
            await client.close()

    async def _host_ready(self, client: PrismClient, host: str, want: int) -> bool:

        try:
            msg = await client.nc.request(subjects.host_cmd(host), b'{"kind": "status"}', timeout=1.0)
            status = json.loads(msg.data)
        except (NoRespondersError, NatsTimeoutError, json.JSONDecodeError):
            return False  # not subscribed yet
        return isinstance(status, dict) and len(status.get("experts", [])) == want

    def _all(self) -> list[Child]:
        return [*self.servers, *self.services]

    async def _until_ready(
        self, what: str, watch: list[Child], probe: Callable[[], Awaitable[bool]], timeout_s: float | None = None
    ) -> None:
        """Poll `probe` until True; fail fast when a watched child exits; bounded by the ready timeout."""
        timeout_s = timeout_s or self.options.ready_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            for child in watch:
                if (failure := child.failure()) is not None:
                    raise StackError(failure)
            if await probe():
                return
            if loop.time() > deadline:
                raise StackError(f"{what} was not ready within {timeout_s:g} s; logs in {self.run_dir}")
            await asyncio.sleep(0.1)

    # ---- supervision -----------------------------------------------------------------------------

    async def supervise(self, report: Callable[[str], None], poll_s: float = 0.5) -> None:
        """Restart every child that exits while serving, until cancelled (before `stop()`). A child
        that fails RESTARTS_PER_MINUTE times within a minute is left stopped: it would only loop."""
        restarts: dict[str, list[float]] = {}
        while True:
            for child in self._all():
                if child.returncode is None or child.name in self.given_up:
                    continue
                report(str(child.failure()))
                now = time.monotonic()
                recent = [t for t in restarts.get(child.name, []) if now - t < 60.0] + [now]
                restarts[child.name] = recent
                if len(recent) > RESTARTS_PER_MINUTE:
                    self.given_up.add(child.name)
                    report(f"{child.name} failed {len(recent)} times within a minute; it stays stopped")
                    continue
                await self._restart(child)
                report(f"{child.name} restarted (pid {child.pid})")
                self._write_manifest(ready=True)
            await asyncio.sleep(poll_s)

    async def _restart(self, child: Child) -> None:
        """Start `child` again; an expert host with the experts it last reported holding (its first
        ones may have moved since). Not the current plan's: during a migration that would drop experts
        whose new holders have not loaded them yet. The migrator resends the command it lost."""
        host = child.name.removeprefix("host-") if child.name.startswith("host-") else None
        if host is not None and child.env is not None:
            keys = await self._last_held(host)
            if keys is not None:
                child.env = {**child.env, "PRISM_HOST_EXPERTS": _format_experts(keys)}
        await child.start()

    async def _last_held(self, host: str) -> list[tuple[int, int]] | None:
        """The experts of the host's last heartbeat (KV prism_hosts, kept host_ttl_s), else of the
        current plan; None when the hub cannot tell (the host restarts as it first started)."""
        import nats

        from shared.schemas import HostStatus

        async def quiet(_: Exception) -> None:  # the hub may be restarting too: no traceback on stderr
            pass

        try:
            nc = await nats.connect(self.hub_url, max_reconnect_attempts=0, connect_timeout=2, error_cb=quiet)
        except Exception:  # the hub itself is down
            return None
        try:
            with contextlib.suppress(Exception):  # no bucket, no key (expired), or a malformed status
                kv = await nc.jetstream(domain=subjects.JETSTREAM_DOMAIN).key_value(subjects.KV_HOSTS)
                entry = await kv.get(host)
                return [(int(k[0]), int(k[1])) for k in HostStatus.model_validate_json(entry.value or b"").experts]
            plan = await read_plan(nc)
            if plan is not None and host in plan["hosts"]:
                return [(int(k[0]), int(k[1])) for k in plan["hosts"][host]]
            return None
        finally:
            await nc.close()

    # ---- stop -----------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Gatings first: they drain their requests while the hosts still answer. Then the other
        services, the leaves, the links and the hub."""
        bound = self.options.stop_timeout_s
        gatings = [child for child in self.services if child.name.startswith("gating-")]
        await asyncio.gather(*(child.stop(bound) for child in gatings))
        await asyncio.gather(*(child.stop(bound) for child in self.services if child not in gatings))
        leaves = [c for c in self.servers if c.name != "hub"]
        await asyncio.gather(*(child.stop(bound) for child in leaves))
        for link in self.links.values():
            await link.stop()
        await asyncio.gather(*(child.stop(bound) for child in self.servers))

    async def __aenter__(self) -> LocalStack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- reporting ------------------------------------------------------------------------------

    def _write_manifest(self, *, ready: bool) -> None:
        """`<run_dir>/stack.json`: URLs, pids and placement, for tools and tests (rewritten when ready)."""
        data = {
            "ready": ready,
            "hub_url": self.hub_url,
            "leaf_urls": self.leaf_urls,
            "pids": {child.name: child.pid if child.returncode is None else None for child in self._all()},
            "placement": {host: [list(k) for k in keys] for host, keys in self.placement.items()},
            "max_payload": self.max_payload,
        }
        (self.run_dir / "stack.json").write_text(json.dumps(data, indent=2) + "\n")


def _overridden(var: str, value: str) -> bool:
    """The environment sets `var` to something else than `value` ("3" and "3.0" are the same number)."""
    given = os.environ.get(var)
    if given is None or given == value:
        return False
    with contextlib.suppress(ValueError):
        return float(given) != float(value)
    return True


def _format_experts(keys: list[tuple[int, int]]) -> str:
    from services.expert_host.residency import format_experts

    return format_experts(keys)


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def _service_answers(client: PrismClient, name: str) -> bool:
    try:
        await client.nc.request(f"$SRV.PING.{name}", b"", timeout=1.0)
    except (NoRespondersError, NatsTimeoutError):
        return False
    return True


async def _node_ready(client: PrismClient, node: str) -> bool:
    """A one-token request answers: the gating is up and reaches a holder of every expert it chose."""
    try:
        await client.infer(node, {"input_ids": [0], "max_tokens": 1}, timeout_s=10.0)
    except InferError as exc:
        if exc.code in {"no_responders", "timeout", "expert_unavailable"}:
            return False
        raise StackError(f"node {node} answered a test request with error {exc.code}: {exc.message}") from None
    return True
