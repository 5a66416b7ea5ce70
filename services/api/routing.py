"""Which node answers a request: the header's, else the configured one, else the least-loaded gating.

Pure: the loads come from the gatings' `$SRV.STATS` replies (endpoint data `load`, a GatingLoad), read
by the service every `stats_interval_s`; `pending` counts what this API sent each node since that reading,
so that a burst between two readings does not all go to the node that was idle.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from shared.schemas import GatingLoad


def parse_loads(replies: list[dict[str, Any]]) -> dict[str, GatingLoad]:
    """node → its load, from `$SRV.STATS.prism-gating` replies; several gatings of a node add up."""
    loads: dict[str, GatingLoad] = {}
    for reply in replies:
        for endpoint in reply.get("endpoints") or []:
            data = endpoint.get("data") if isinstance(endpoint, dict) else None
            try:
                load = GatingLoad.model_validate((data or {}).get("load"))
            except ValidationError:
                continue  # another version, or not a gating
            if load.node in loads:
                seen = loads[load.node]
                load = load.model_copy(update={"active": seen.active + load.active,
                                               "waiting": seen.waiting + load.waiting,
                                               "max_batch": seen.max_batch + load.max_batch})
            loads[load.node] = load
    return loads


def least_loaded(loads: dict[str, GatingLoad], pending: dict[str, int]) -> str | None:
    """The node with the lowest (active + waiting + pending) per batch slot; ties by name; None if none."""
    def busy(node: str) -> tuple[float, str]:
        load = loads[node]
        return (load.active + load.waiting + pending.get(node, 0)) / max(load.max_batch, 1), node

    return min(loads, key=busy, default=None)
