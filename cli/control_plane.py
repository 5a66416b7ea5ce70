"""What `prism up` gives the placement service and the migrator (their settings, epoch 1 of the plan), and
reads back from them (the current plan)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from shared import subjects

if TYPE_CHECKING:  # cli.stack_plan imports this module
    from cli.stack_plan import StackOptions


def control_plane_env(opts: StackOptions) -> tuple[dict[str, str], dict[str, str]]:
    """(placement env, migrator env) from StackOptions."""
    placement = {
        "PRISM_PLACEMENT_NODES": ",".join(node.name for node in opts.topology.nodes),
        "PRISM_PLACEMENT_POLICY": opts.policy,
        "PRISM_PLACEMENT_DTYPE": opts.topology.dtype,
        "PRISM_PLACEMENT_PLAN_INTERVAL_S": str(opts.plan_interval_s),
        "PRISM_PLACEMENT_MIGRATION_COST_CALLS": str(opts.migration_cost_calls),
        "PRISM_PLACEMENT_MIN_WINDOW_TOKENS": str(opts.min_window_tokens),
        "PRISM_PLACEMENT_LINKS": opts.topology.links_json(),
        "PRISM_PLACEMENT_HOST_TTL_S": str(opts.host_ttl_s),
    }
    migrator = {"PRISM_MIGRATOR_DTYPE": str(opts.topology.dtype), "PRISM_MIGRATOR_HOST_TTL_S": str(opts.host_ttl_s)}
    return placement, migrator


async def write_initial_plan(
    hub_url: str, model_name: str, placement: dict[str, list[tuple[int, int]]],
    routes: dict[str, list[str]] | None = None,
) -> None:
    """Epoch 1 of KV `prism_placement`: the static placement the hosts start with (and, for a routed
    policy, its routes). The placement service takes over from it once statistics justify a move."""
    import nats

    plan = {
        "epoch": 1,
        "model": model_name,
        "policy": "initial",
        "hosts": {host: [list(k) for k in keys] for host, keys in placement.items()},
        **({"routes": routes} if routes else {}),
    }
    nc = await nats.connect(hub_url, max_reconnect_attempts=1)
    try:
        js = nc.jetstream(domain=subjects.JETSTREAM_DOMAIN)
        kv = await js.create_key_value(bucket=subjects.KV_PLACEMENT, history=16)
        await kv.put(subjects.KV_PLAN_KEY, json.dumps(plan).encode())
    finally:
        await nc.close()


async def read_plan(nc: Any) -> dict[str, Any] | None:
    """The placement plan in KV `prism_placement` (None without one, or without access to it)."""
    plan = await _read_placement(nc, subjects.KV_PLAN_KEY)
    return plan if isinstance(plan, dict) and isinstance(plan.get("hosts"), dict) else None


async def read_links(nc: Any) -> list[dict[str, Any]] | None:
    """Each node's link to the hub that plans are made for, KV `prism_placement` key `links`
    (`[{"node", "delay_ms", "rate_mbit"}]`; None without them, or without access to them)."""
    links = await _read_placement(nc, subjects.KV_LINKS_KEY)
    return links if isinstance(links, list) and all(isinstance(link, dict) for link in links) else None


async def _read_placement(nc: Any, key: str) -> Any:
    import nats.errors

    try:
        kv = await nc.jetstream(domain=subjects.JETSTREAM_DOMAIN).key_value(subjects.KV_PLACEMENT)
        entry = await kv.get(key)
        return json.loads(entry.value or b"null")
    except (nats.errors.Error, TimeoutError, ValueError):  # no JetStream, bucket, key or permission
        return None
