"""This node's route from the placement plan, switched make-before-break.

The plan in KV `prism_placement` may carry `routes: {home node: [executing node per layer]}` (absent,
or no entry for this node: every layer at home). A gating takes its node's route for *new* requests
once the migrator has applied the plan's epoch (`prism.v1.plan.applied` with `ok`), so a route never
runs ahead of the experts its nodes are to hold; running requests keep the route they started with
(their KV lives along it). The plan found at start, and `prism up`'s initial plan (`"policy":
"initial"`, which the hosts start with), apply at once. Pure: the service feeds it plans and events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from services.gating.routes import Route, check_route

log = structlog.get_logger()

PENDING_PLANS = 8  # epochs remembered while their migration runs


class RouteFollower:
    """Calls `switch(route, epoch)` when this node's route of an applied plan differs from the current one."""

    def __init__(self, node: str, num_layers: int, switch: Callable[[Route | None, int], None]) -> None:
        self.node = node
        self.num_layers = num_layers
        self.switch = switch
        self.epoch = 0  # of the route in force
        self.applied = 0  # highest epoch the migrator applied
        self.pending: dict[int, Route | None] = {}

    def on_plan(self, plan: Any, *, current: bool = False) -> None:
        """A plan from the KV; `current`: the one found at start, in force already."""
        if not isinstance(plan, dict) or not isinstance(plan.get("epoch"), int):
            return
        epoch = plan["epoch"]
        try:
            route = self._route_of(plan)
        except ValueError as exc:  # a bad route must not stop the node: it keeps the one it has
            log.warning("route_refused", node=self.node, epoch=epoch, error=str(exc))
            return
        if current or plan.get("policy") == "initial" or epoch <= self.applied:
            self._take(route, epoch)
            return
        self.pending[epoch] = route
        for old in sorted(self.pending)[:-PENDING_PLANS]:
            del self.pending[old]

    def on_applied(self, event: Any) -> None:
        """A `prism.v1.plan.applied` event: the plan of that epoch now holds, and so may its route."""
        if not isinstance(event, dict) or event.get("ok") is not True or not isinstance(event.get("epoch"), int):
            return
        self.applied = max(self.applied, event["epoch"])
        if event["epoch"] in self.pending:
            self._take(self.pending.pop(event["epoch"]), event["epoch"])

    def _route_of(self, plan: dict[str, Any]) -> Route | None:
        routes = plan.get("routes") or {}
        if not isinstance(routes, dict):
            raise ValueError("routes must be an object {home node: [node per layer]}")
        route = routes.get(self.node)
        if route is None:
            return None
        if not isinstance(route, list) or not all(isinstance(n, str) for n in route):
            raise ValueError(f"the route of {self.node} must be a list of node names")
        checked = check_route(route, self.num_layers)
        return None if set(checked) == {self.node} else checked

    def _take(self, route: Route | None, epoch: int) -> None:
        if epoch < self.epoch:
            return
        self.epoch = epoch
        self.switch(route, epoch)
