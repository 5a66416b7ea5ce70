"""Errors of the placement package: all are PlacementError, a ValueError (bad input, not a bug)."""

from __future__ import annotations


class PlacementError(ValueError):
    """Base class: a placement input or result that breaks a rule; the message says which and why."""


class InvalidInputError(PlacementError):
    """Counts, cluster or workload with a wrong shape, a NaN, a negative count, an unknown name."""


class InfeasibleError(PlacementError):
    """No placement can exist: fewer slots in total than logical experts."""


class CoverageError(PlacementError):
    """A placement leaves some logical expert without any replica."""


class CapacityError(PlacementError):
    """A placement puts more replicas on a host than it has slots."""
