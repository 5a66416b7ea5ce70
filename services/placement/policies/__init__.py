"""Registry of placement policies, keyed by `PolicyName` and checked against it at import.

Every policy is a pure function `policy(freq [N, L, E], cluster, *, coact, current, workload) ->
Placement` (see `services.placement.types.Policy`): every logical expert on at least one host, no host
over its slots, the same output for the same input. `pipeline` and `route` also return routes
(`Placement.routes`, [N, L] executing node per home and layer); the others leave them None (stay-home).
"""

from __future__ import annotations

from typing import get_args

from services.placement.errors import InvalidInputError
from services.placement.policies.eplb import eplb
from services.placement.policies.latency import latency
from services.placement.policies.optimal import optimal
from services.placement.policies.pipeline import pipeline
from services.placement.policies.prism import prism
from services.placement.policies.redundance import redundance
from services.placement.policies.route import route
from services.placement.policies.uniform import uniform
from services.placement.types import Policy, PolicyName

POLICIES: dict[PolicyName, Policy] = {
    "uniform": uniform,
    "redundance": redundance,
    "eplb": eplb,
    "prism": prism,
    "optimal": optimal,
    "latency": latency,
    "pipeline": pipeline,
    "route": route,
}

_missing = set(get_args(PolicyName)) ^ set(POLICIES)
if _missing:  # an import-time check, so a renamed policy cannot silently vanish from the CLI
    raise ImportError(f"POLICIES and PolicyName disagree on {sorted(_missing)}")


def get_policy(name: str) -> Policy:
    """The policy registered under `name`; InvalidInputError lists the accepted names otherwise."""
    if name not in POLICIES:
        raise InvalidInputError(f"unknown placement policy {name!r}; accepted: {', '.join(POLICIES)}")
    return POLICIES[name]


__all__ = ["POLICIES", "Policy", "PolicyName", "get_policy"]
