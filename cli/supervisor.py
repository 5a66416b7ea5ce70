"""The children of `prism up` while they run: restart one that dies, stop them all in order.

An expert host restarts with the experts it last reported holding, a gating with its embedded hosts'
experts as they last reported them (the first ones may have moved
since); not the current plan's: during a migration that would drop experts whose new holders have
not loaded them yet. The migrator resends the command the dead host lost. A child that fails
RESTARTS_PER_MINUTE times within a minute is left stopped: it would only loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cli.control_plane import read_plan
from cli.stack_plan import format_experts
from shared import subjects
from shared.nats_server import NatsServer, NatsServerError
from shared.process import Child

RESTARTS_PER_MINUTE = 5


class Supervisor:
    """`servers` (hub first) and `services`, as started; `on_restart` runs after each restart."""

    def __init__(self, hub_url: str, stop_timeout_s: float) -> None:
        self.hub_url = hub_url
        self.stop_timeout_s = stop_timeout_s
        self.servers: list[NatsServer] = []
        self.services: list[Child] = []
        self.given_up: set[str] = set()  # children that kept failing: not restarted again

    def children(self) -> list[Child]:
        return [*self.servers, *self.services]

    async def supervise(
        self, report: Callable[[str], None], on_restart: Callable[[], None], poll_s: float = 0.5
    ) -> None:
        """Restart every child that exits, until cancelled (before `stop()`)."""
        restarts: dict[str, list[float]] = {}
        while True:
            for child in self.children():
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
                try:
                    await self.restart(child)
                except (NatsServerError, OSError) as exc:  # it exited again at once: the next round counts it
                    report(f"{child.name} did not restart: {exc}")
                    continue
                report(f"{child.name} restarted (pid {child.pid})")
                on_restart()
            await asyncio.sleep(poll_s)

    async def restart(self, child: Child) -> None:
        """Start `child` again; an expert host (a process, or embedded in a gating) with the experts it
        last reported holding."""
        if child.env is not None and child.name.startswith("host-"):
            keys = await self.last_held(child.name.removeprefix("host-"))
            if keys is not None:
                child.env = {**child.env, "PRISM_HOST_EXPERTS": format_experts(keys)}
        elif child.env is not None and "PRISM_GATING_EMBEDDED_HOSTS" in child.env:
            child.env = {**child.env, "PRISM_GATING_EMBEDDED_HOSTS": await self._embedded_last_held(child.env)}
        await child.start()

    async def _embedded_last_held(self, env: dict[str, str]) -> str:
        """A gating's PRISM_GATING_EMBEDDED_HOSTS with each host's experts as it last reported them."""
        hosts = json.loads(env["PRISM_GATING_EMBEDDED_HOSTS"])
        held = await self.last_held_all([host["host"] for host in hosts])
        for host in hosts:
            if (keys := held[host["host"]]) is not None:
                host["experts"] = format_experts(keys)
        return json.dumps(hosts, separators=(",", ":"))

    async def last_held(self, host: str) -> list[tuple[int, int]] | None:
        """The experts of the host's last heartbeat (KV prism_hosts, kept host_ttl_s), else of the
        current plan; None when the hub cannot tell (the host restarts as it first started)."""
        return (await self.last_held_all([host]))[host]

    async def last_held_all(self, hosts: list[str]) -> dict[str, list[tuple[int, int]] | None]:
        """`last_held` of several hosts, over one connection to the hub."""
        import nats

        async def quiet(_: Exception) -> None:  # the hub may be restarting too: no traceback on stderr
            pass

        try:
            nc = await nats.connect(self.hub_url, max_reconnect_attempts=0, connect_timeout=2, error_cb=quiet)
        except Exception:  # the hub itself is down
            return dict.fromkeys(hosts)
        try:
            plan = await read_plan(nc)
            held = {host: await _reported(nc, host) for host in hosts}
            return {host: _planned(plan, host) if keys is None else keys for host, keys in held.items()}
        finally:
            await nc.close()

    async def stop(self, before_hub: Callable[[], Awaitable[None]] | None = None) -> None:
        """The HTTP API first (no new requests; its streams end), then the gatings: they drain their
        requests while the hosts still answer. Then the other services, the leaves, `before_hub` (the
        links) and the hub."""
        bound = self.stop_timeout_s
        api = [child for child in self.services if child.name == "api"]
        gatings = [child for child in self.services if child.name.startswith("gating-")]
        await asyncio.gather(*(child.stop(bound) for child in api))
        await asyncio.gather(*(child.stop(bound) for child in gatings))
        await asyncio.gather(*(child.stop(bound) for child in self.services if child not in gatings + api))
        await asyncio.gather(*(server.stop(bound) for server in self.servers[1:]))
        if before_hub is not None:
            await before_hub()
        await asyncio.gather(*(server.stop(bound) for server in self.servers[:1]))


async def _reported(nc: Any, host: str) -> list[tuple[int, int]] | None:
    """The experts of the host's last heartbeat in KV prism_hosts; None when there is none."""
    from shared.schemas import HostStatus

    with contextlib.suppress(Exception):  # no bucket, no key (expired), or a malformed status
        kv = await nc.jetstream(domain=subjects.JETSTREAM_DOMAIN).key_value(subjects.KV_HOSTS)
        entry = await kv.get(host)
        return [(int(k[0]), int(k[1])) for k in HostStatus.model_validate_json(entry.value or b"").experts]
    return None


def _planned(plan: dict[str, Any] | None, host: str) -> list[tuple[int, int]] | None:
    """The host's experts in the current plan; None without a plan or an entry."""
    if plan is None or host not in plan["hosts"]:
        return None
    return [(int(k[0]), int(k[1])) for k in plan["hosts"][host]]
