"""Prism's error hierarchy: every error a caller can see has a stable string code and an HTTP-like status.

The code goes into error replies (`{"error": {"code", "message"}}`) and the status into the
`Nats-Service-Error-Code` header, as nats.micro does. Messages say what was wrong and what is accepted.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class PrismError(Exception):
    """Base of all errors Prism reports to a caller. Every subclass, wherever it is defined, is
    registered under its code, so that `error_from_headers` rebuilds it."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _BY_CODE.setdefault(cls.code, cls)  # the first class of a code (InvalidJSON's parent is BadRequest)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    def body(self) -> bytes:
        """The JSON reply `{"error": {"code", "message"}}` (send it with `headers()`)."""
        return json.dumps({"error": self.to_dict()}).encode()

    def headers(self) -> dict[str, str]:
        """nats.micro-style error headers; the string code rides in the description."""
        return {ERROR_HEADER: f"{self.code}: {self.message}"[:1024], ERROR_CODE_HEADER: str(self.status)}


_BY_CODE: dict[str, type[PrismError]] = {"internal": PrismError}
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


def error_from_headers(headers: dict[str, str] | None) -> PrismError | None:
    """Rebuild the error a service replied with, or None when the reply is not an error."""
    if not headers or ERROR_CODE_HEADER not in headers:
        return None
    code, _, message = headers.get(ERROR_HEADER, "").partition(": ")
    cls = _BY_CODE.get(code, PrismError)
    return cls(message or code or f"service error {headers[ERROR_CODE_HEADER]}")


class BadRequest(PrismError):
    """The request is well-formed JSON but breaks the contract (range, exclusivity, types)."""

    code = "invalid_request"
    status = 400


class InvalidJSON(BadRequest):
    code = "invalid_json"


class PromptTooLong(BadRequest):
    code = "prompt_too_long"


class TokenOutOfRange(BadRequest):
    code = "token_out_of_range"


class PayloadTooLarge(PrismError):
    """A message (payload plus headers) would exceed the server's max_payload."""

    code = "payload_too_large"
    status = 413


class BadTensor(PrismError):
    """A tensor envelope is corrupt or does not match what the receiver expects."""

    code = "bad_tensor"
    status = 400


class UnknownExpert(PrismError):
    """A batch arrived for an expert this host does not hold."""

    code = "unknown_expert"
    status = 404


class ExpertUnavailable(PrismError):
    """No host answered for an expert within the timeout, or the host reported a failure."""

    code = "expert_unavailable"
    status = 503


class Overloaded(PrismError):
    """The service has no room for more work right now; retry later."""

    code = "overloaded"
    status = 503


class Cancelled(PrismError):
    """The requester cancelled the request (`prism.v1.infer.<node>.cancel`); its sequence is freed."""

    code = "cancelled"
    status = 499  # "client closed request", as nginx names it


class ShuttingDown(PrismError):
    code = "shutting_down"
    status = 503


class OverBudget(PrismError):
    """Loading these experts would exceed the host's memory limit."""

    code = "over_budget"
    status = 507




class RouteUnavailable(PrismError):
    """A node on the request's route did not answer its segment in time (or is gone)."""

    code = "route_unavailable"
    status = 503


class RouteNotServing(RouteUnavailable):
    """A node of the route had nothing subscribed to its segments' subject (the server said "no
    responders"): a request that has no token yet can start again at home (the gating does; the KV a
    node before it kept for the request is released as for any failed request)."""


class BadSegment(PrismError):
    """A route segment this node cannot run: wrong shapes, an unknown request, a layer range not its own."""

    code = "bad_segment"
    status = 400
