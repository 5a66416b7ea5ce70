"""Prism's error hierarchy: every error a caller can see has a stable string code and an HTTP-like status.

The code goes into error replies (`{"error": {"code", "message"}}`) and the status into the
`Nats-Service-Error-Code` header, as nats.micro does. Messages say what was wrong and what is accepted.
"""

from __future__ import annotations

from typing import Any, ClassVar


class PrismError(Exception):
    """Base of all errors Prism reports to a caller. Extra keyword fields are kept for logging."""

    code: ClassVar[str] = "internal"
    status: ClassVar[int] = 500

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


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


class ShuttingDown(PrismError):
    code = "shutting_down"
    status = 503
