"""Which host holds which expert, learnt from host heartbeats, so a gating can send one message per
host and layer instead of one per expert.

The serving rule is the one the placement models and the simulator assume
(services/placement/sim_resources.py `serving_nodes`, `serving_hosts`), so that what a plan is rated
for is what runs: an expert this node holds is served here; otherwise by the nearest node holding it
(lowest round trip through the hub, then highest rate, then the next node after this one in the
topology's order, cyclically, which spreads requesters over equally near replicas). Among that
node's holding hosts (by name), this node's calls to expert e go to the (n + e) mod count-th, n being
this node's index. Without links every node is equally near. The links are the gating's settings
(the topology's) until the placement service publishes measured ones (services/placement/link_probe.py),
the links it plans with.

A stale entry is harmless: the host refuses experts it no longer holds and the gating falls back to
the expert's own subject, where NATS finds a holder.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from pydantic import ValidationError

from shared.schemas import HostStatus
from shared.settings import DEFAULT_HOST_TTL_S
from shared.topology import NODE_LINKS, NodeLink, star_links

log = structlog.get_logger()

Key = tuple[int, int]


class HostDirectory:
    def __init__(self, node: str, max_age_s: float = DEFAULT_HOST_TTL_S, links: list[NodeLink] | None = None) -> None:
        self.node = node
        self.max_age_s = max_age_s
        self._links = list(links or [])
        self._hosts: dict[str, tuple[HostStatus, float]] = {}
        self._holders: dict[Key, list[str]] = {}  # nearest node's hosts first, then the next node's, by name
        self._index = 0  # this node's position in the node order (the `n` of the rule above)

    def on_status(self, payload: bytes) -> None:
        """One heartbeat (HostStatus JSON) from `prism.v1.host.<host>.status`."""
        try:
            status = HostStatus.model_validate_json(payload)
        except ValidationError:
            return
        previous = self._hosts.get(status.host)
        self._hosts[status.host] = (status, time.monotonic())
        if previous is None or previous[0].experts != status.experts or previous[0].node != status.node:
            self._rebuild()

    @property
    def links(self) -> list[NodeLink]:
        """Each node's link to the hub that this directory serves by."""
        return list(self._links)

    def use_links(self, links: Any, *, current: bool = False) -> None:
        """Serve by `links` (KV `prism_placement` key `links`: JSON [{node, delay_ms, rate_mbit}]) from now
        on; bad ones are logged and the links in use kept. (`current`: found at start; no difference.)"""
        try:
            parsed = NODE_LINKS.validate_python(links)
        except ValidationError as exc:
            log.warning("links_refused", node=self.node, error=str(exc).splitlines()[0])
            return
        if parsed != self._links:
            self._links = parsed
            self._rebuild()

    def node_order(self) -> list[str]:
        """Nodes nearest first: this one, then the others by the rule above. Nodes the links do not
        name (or all, without links) count as equally near, ranked after those the links name."""
        return self._nearest_first(*self._indexed_nodes())

    def _indexed_nodes(self) -> tuple[list[str], int]:
        """Every node known, in order (the links', then the others by name), and this node's index."""
        names = [link.node for link in self._links]
        order = names + sorted(({s.node for s, _ in self._hosts.values()} | {self.node}) - set(names))
        return order, order.index(self.node)

    def _nearest_first(self, order: list[str], n: int) -> list[str]:
        rtt, rate = star_links(list(self._links))
        known = len(self._links)

        def distance(m: int) -> tuple[bool, float, float, int]:
            named = n < known and m < known
            return m >= known, rtt[n][m] if named else 0.0, -rate[n][m] if named else 0.0, (m - n) % len(order)

        return [self.node, *(order[m] for m in sorted((m for m in range(len(order)) if m != n), key=distance))]

    def _rebuild(self) -> None:
        order, self._index = self._indexed_nodes()
        rank = {node: i for i, node in enumerate(self._nearest_first(order, self._index))}
        holders: dict[Key, list[str]] = {}
        for status, _ in sorted(self._hosts.values(), key=lambda v: (rank[v[0].node], v[0].host)):
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
            nearest = self._hosts[live[0]][0].node
            pool = [h for h in live if self._hosts[h][0].node == nearest]
            by_host.setdefault(pool[(self._index + expert) % len(pool)], []).append(expert)
        return by_host, unknown
