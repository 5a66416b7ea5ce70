"""Expert placement: which host holds which routed experts. Everything here but `service.py` (the NATS
service) is pure logic and never imports nats.

`types` holds the shared data types and the proxy objective, `policies` the registry of policies.
"""

from services.placement.errors import (
    CapacityError,
    CoverageError,
    InfeasibleError,
    InvalidInputError,
    PlacementError,
)
from services.placement.types import (
    Cluster,
    CoActivation,
    Placement,
    Policy,
    PolicyName,
    Workload,
    check_inputs,
    proxy_objective,
    validate,
)

__all__ = [
    "CapacityError",
    "Cluster",
    "CoActivation",
    "CoverageError",
    "InfeasibleError",
    "InvalidInputError",
    "Placement",
    "PlacementError",
    "Policy",
    "PolicyName",
    "Workload",
    "check_inputs",
    "proxy_objective",
    "validate",
]
