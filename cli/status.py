"""`prism status`: what is running, found through nats.micro discovery.

    prism status [--url nats://...] [--wait S] [--json]

Every Prism service answers `$SRV.PING`; each expert host's `$SRV.STATS` reply carries its HostStatus
(node, device, resident experts, memory, expert calls and messages answered, seconds spent answering them,
errors), each gating's its GatingLoad (batch, queue, route, foreign KV). Prints one line per gating and host,
grouped by node, then the control-plane services and, from the placement plan in KV `prism_placement`, the
experts no live host holds (lost with a host, until the next plan moves them), and each node's link
to the hub that plans use (KV key `links`, measured by the placement service). --json prints
{"services": [...], "hosts": [...], "gatings": {node: load}, "plan": {...}, "links": [...]}.
Exits 1 when nothing answers within --wait.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cli.args import EXIT_ERROR, add_connection_args, positive
from cli.control_plane import read_links, read_plan
from shared import subjects

HOST_SERVICE = subjects.SERVICE_HOST


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("status", help="list the running gatings, expert hosts and services")
    add_connection_args(p)
    p.add_argument("--wait", type=positive, default=0.5, help="seconds to collect answers (default 0.5)")
    p.add_argument("--json", action="store_true", help="print the raw answers as JSON")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from shared.runtime import run

    return run(lambda: status(args))


async def status(args: argparse.Namespace) -> int:
    from cli.client import InferError, PrismClient

    try:
        async with await PrismClient.connect(args.url, user=args.user, password=args.password) as client:
            services = await client.gather("$SRV.PING", args.wait)
            stats = await client.gather(f"$SRV.STATS.{HOST_SERVICE}", args.wait)
            gating_stats = await client.gather(f"$SRV.STATS.{subjects.SERVICE_GATING}", args.wait)
            plan = await read_plan(client.nc)
            links = await read_links(client.nc)
    except InferError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    if not services:
        print(f"error no_responders: no Prism service answered at {args.url}; is `prism up` running?", file=sys.stderr)
        return EXIT_ERROR
    hosts = sorted((h for st in stats if (h := endpoint_data(st, "status"))), key=lambda h: (h["node"], h["host"]))
    gatings = {g["node"]: g for st in gating_stats if (g := endpoint_data(st, "load"))}
    coverage = plan_coverage(plan, hosts)
    if args.json:
        print(json.dumps({"services": services, "hosts": hosts, "gatings": gatings, "plan": coverage,
                          "links": links}))
    else:
        print("\n".join(render(services, hosts, gatings)))
        if coverage:
            print(render_coverage(coverage))
        if links:
            print("links to the hub that plans use: " + ", ".join(map(describe_link, links)))
    return 0


def describe_link(link: dict[str, Any]) -> str:
    """'edge-a 1.02 ms one way, 340 Mbit/s' (a rate of None: no limit)."""
    rate = link.get("rate_mbit")
    return f"{link.get('node')} {link.get('delay_ms')} ms one way, " + (f"{rate} Mbit/s" if rate else "no rate limit")


def plan_coverage(plan: dict[str, Any] | None, hosts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The plan's epoch, its experts, and those that no answering host holds (lost with a host)."""
    if plan is None:
        return None
    planned = {(int(k[0]), int(k[1])) for keys in plan["hosts"].values() for k in keys}
    held = {(int(k[0]), int(k[1])) for h in hosts for k in h["experts"]}
    missing = sorted(planned - held)
    return {"epoch": plan.get("epoch"), "experts": len(planned), "held_nowhere": [list(k) for k in missing]}


def render_coverage(coverage: dict[str, Any]) -> str:
    missing = coverage["held_nowhere"]
    line = f"plan epoch {coverage['epoch']}: {coverage['experts']} experts, "
    if not missing:
        return line + "every one held by a live host"
    shown = ", ".join(f"{layer}.{expert}" for layer, expert in missing[:8])
    return line + f"{len(missing)} held by no live host ({shown}{', …' if len(missing) > 8 else ''})"


def endpoint_data(stats: dict[str, Any], key: str) -> dict[str, Any] | None:
    """`key` of one service's `$SRV.STATS` reply, from its endpoint's stats data: a host's "status"
    (HostStatus), a gating's "load" (GatingLoad)."""
    for endpoint in stats.get("endpoints") or []:
        data = endpoint.get("data") or {}
        if isinstance(data.get(key), dict):
            return dict(data[key])
    return None


def gating_line(node: str, load: dict[str, Any] | None) -> str:
    """`node: gating up`, with its batch and, where it has one, its route and the foreign KV it keeps."""
    if load is None:
        return f"{node}: gating up"
    line = f"{node}: gating up, {load['active']}/{load['max_batch']} running, {load['waiting']} waiting"
    if load.get("route"):
        line += f", route {' '.join(load['route'])}"
    if load.get("segments_run") or load.get("foreign_kv"):
        line += f", {load['segments_run']} segments run for other nodes, foreign KV {load['foreign_kv']}"
    return line


def render(
    services: list[dict[str, Any]], hosts: list[dict[str, Any]], loads: dict[str, dict[str, Any]] | None = None
) -> list[str]:
    gatings = sorted(
        s.get("metadata", {}).get("node", "?") for s in services if s.get("name") == subjects.SERVICE_GATING
    )
    lines = []
    for node in sorted({*gatings, *(h["node"] for h in hosts)}):
        lines.append(gating_line(node, (loads or {}).get(node)) if node in gatings else f"{node}: gating NOT ANSWERING")
        lines.extend(f"  {host_line(h)}" for h in hosts if h["node"] == node)
    others: dict[str, int] = {}
    for s in services:
        if s.get("name") not in (subjects.SERVICE_GATING, HOST_SERVICE):
            others[str(s.get("name"))] = others.get(str(s.get("name")), 0) + 1
    if others:
        lines.append("services: " + ", ".join(f"{name} ×{n}" for name, n in sorted(others.items())))
    return lines


def host_line(h: dict[str, Any]) -> str:
    messages = int(h.get("messages_served", 0))
    busy = f"{1000 * h.get('busy_s', 0.0) / messages:.2f} ms each" if messages else "—"
    mb = 2**20
    return (
        f"host {h['host']} ({h['device']}{', embedded' if h.get('embedded') else ''}): {len(h['experts'])} experts, "
        f"{h['memory_used_bytes'] / mb:.1f}/{h['memory_limit_bytes'] / mb:.0f} MB, "
        f"{h['calls_served']} expert calls in {messages} messages ({busy}), {h.get('direct_calls', 0)} direct, "
        f"queue {h['queue_depth']}, errors {h['errors']}"
    )
