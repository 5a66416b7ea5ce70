"""When `prism up` is ready: every host answers `status` with its experts, the migrator and the
placement service answer a micro PING, every node answers a one-token request, and the HTTP API
answers `GET /v1/models` (401 counts: it serves, and wants the key). Each wait fails
fast when a watched child exits, and is bounded."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import ValidationError

from cli.client import InferError, PrismClient
from cli.stack_plan import StackError
from shared import subjects
from shared.process import Child
from shared.schemas import HostStatus
from shared.topology import Topology


async def wait_ready(
    hub_url: str, topology: Topology, placement: dict[str, list[tuple[int, int]]], *,
    watch: Callable[[], Sequence[Child]], timeout_s: float, run_dir: Path, api_port: int = 0,
) -> None:
    """Hosts (with their experts), then the control plane (weights up, statistics on), then the gatings,
    then the HTTP API (when `api_port`)."""
    client = await PrismClient.connect(hub_url)

    async def until(what: str, probe: Callable[[], Awaitable[bool]]) -> None:
        await until_ready(what, watch(), probe, timeout_s, run_dir)

    try:
        for node, host in topology.hosts():
            await until(f"host {host.name} of {node.name}",
                        functools.partial(host_ready, client, host.name, len(placement[host.name])))
        for service in (subjects.SERVICE_MIGRATOR, subjects.SERVICE_PLACEMENT):
            await until(service, functools.partial(service_answers, client, service))
        for node in topology.nodes:
            await until(f"gating of {node.name}", functools.partial(node_ready, client, node.name))
        if api_port:
            await until(f"HTTP API on port {api_port}", functools.partial(api_ready, api_port))
    finally:
        await client.close()


async def until_ready(
    what: str, watch: Sequence[Child], probe: Callable[[], Awaitable[bool]], timeout_s: float, run_dir: Path
) -> None:
    """Poll `probe` until True; StackError when a watched child exits or after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        for child in watch:
            if (failure := child.failure()) is not None:
                raise StackError(failure)
        if await probe():
            return
        if loop.time() > deadline:
            raise StackError(f"{what} was not ready within {timeout_s:g} s; logs in {run_dir}")
        await asyncio.sleep(0.1)


async def host_ready(client: PrismClient, host: str, want: int) -> bool:
    """The host answers `status` and holds `want` experts."""
    try:
        msg = await client.nc.request(subjects.host_cmd(host), b'{"kind": "status"}', timeout=1.0)
        status = HostStatus.model_validate_json(msg.data)
    except (NoRespondersError, NatsTimeoutError, ValidationError):
        return False  # not subscribed yet (or an error reply)
    return len(status.experts) == want


async def service_answers(client: PrismClient, name: str) -> bool:
    try:
        await client.nc.request(f"$SRV.PING.{name}", b"", timeout=1.0)
    except (NoRespondersError, NatsTimeoutError):
        return False
    return True


NOT_YET = frozenset({"no_responders", "timeout", "expert_unavailable", "route_unavailable"})
"""Error codes of a node whose gating, or a peer it needs (a holder of an expert, a node on its route
whose segment subscription has not reached the hub yet), is still starting: asked again."""


async def node_ready(client: PrismClient, node: str) -> bool:
    """A one-token request answers: the gating is up and reaches a holder of every expert it chose and
    every node on its route."""
    try:
        await client.infer(node, {"input_ids": [0], "max_tokens": 1}, timeout_s=10.0)
    except InferError as exc:
        if exc.code in NOT_YET:
            return False
        raise StackError(f"node {node} answered a test request with error {exc.code}: {exc.message}") from None
    return True


async def api_ready(port: int) -> bool:
    """`GET /v1/models` on 127.0.0.1:`port` gets an HTTP answer (200, or 401 where a key is required)."""
    try:
        async with asyncio.timeout(2.0):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                await writer.drain()
                status = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return status.split(b" ")[1:2] in ([b"200"], [b"401"])
