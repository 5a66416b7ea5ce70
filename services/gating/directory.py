"""Which host holds which expert, learnt from host heartbeats, so a gating can send one message per
host and layer instead of one per expert.

Holders on the gating's own node come first (the same locality the leaf queue groups give); among
equals an expert goes to `holders[expert % n]`, which spreads a layer's experts over its replicas.
A stale entry is harmless: the host refuses experts it no longer holds and the gating falls back to
the expert's own subject, where NATS finds a holder.
"""

from __future__ import annotations

import time

from pydantic import ValidationError

from shared.schemas import HostStatus
from shared.settings import DEFAULT_HOST_TTL_S

Key = tuple[int, int]


class HostDirectory:
    def __init__(self, node: str, max_age_s: float = DEFAULT_HOST_TTL_S) -> None:
        self.node = node
        self.max_age_s = max_age_s
        self._hosts: dict[str, tuple[HostStatus, float]] = {}
        self._holders: dict[Key, list[str]] = {}  # local hosts first, then the others, by name

    def on_status(self, payload: bytes) -> None:
        """One heartbeat (HostStatus JSON) from `prism.v1.host.<host>.status`."""
        try:
            status = HostStatus.model_validate_json(payload)
        except ValidationError:
            return
        previous = self._hosts.get(status.host)
        self._hosts[status.host] = (status, time.monotonic())
        if previous is None or previous[0].experts != status.experts:
            self._rebuild()

    def _rebuild(self) -> None:
        holders: dict[Key, list[str]] = {}
        ordered = sorted(self._hosts.values(), key=lambda v: (v[0].node != self.node, v[0].host))
        for status, _ in ordered:
            for key in status.experts:
                holders.setdefault((key[0], key[1]), []).append(status.host)
        self._holders = holders

    def calls_on_node(self, by_host: dict[str, list[int]]) -> int:
        """Expert calls of `by_host` (a `route` answer) that go to hosts on this gating's node."""
        return sum(len(experts) for host, experts in by_host.items() if self._hosts[host][0].node == self.node)

    def route(self, layer: int, experts: list[int]) -> tuple[dict[str, list[int]], list[int]]:
        """(host → experts it answers, experts with no known live holder)."""
        horizon = time.monotonic() - self.max_age_s
        by_host: dict[str, list[int]] = {}
        unknown = []
        for expert in experts:
            live = [h for h in self._holders.get((layer, expert), []) if self._hosts[h][1] >= horizon]
            if not live:
                unknown.append(expert)
                continue
            local = [h for h in live if self._hosts[h][0].node == self.node]
            pool = local or live
            by_host.setdefault(pool[expert % len(pool)], []).append(expert)
        return by_host, unknown
