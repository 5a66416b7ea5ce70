"""OpenAI's HTTP protocol as pydantic models (the subset Prism serves), the one error type mapped to
OpenAI's error body, and the SSE framing. Pure: no NATS, no HTTP server.

Requests are strict about what Prism cannot honour: an unknown field, `n` > 1 or a non-zero penalty is a
400, never silently ignored (OpenAI rejects unknown fields too). Fields clients commonly send with
their neutral value (`n: 1`, `presence_penalty: 0`, `logprobs: null`, `user`) are accepted.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.schemas import MAX_TOKENS_LIMIT

FinishReason = Literal["stop", "length"]

# ---- errors ----------------------------------------------------------------------------------

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
# The gating's error codes (shared/errors.py) → HTTP status. Overloaded is 429 here (retry later), as
# OpenAI clients expect; the rest keep their meaning.
_STATUS_OF_CODE = {"invalid_json": 400, "invalid_request": 400, "prompt_too_long": 400, "token_out_of_range": 400,
                   "overloaded": 429, "expert_unavailable": 503, "route_unavailable": 503, "shutting_down": 503,
                   "no_responders": 503, "timeout": 504}


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}

    @classmethod
    def from_gating(cls, code: str, message: str, retry_after_s: int) -> ApiError:
        """The HTTP error for a gating's error reply (`code` from shared/errors.py)."""
        status = _STATUS_OF_CODE.get(code, 500)
        headers = {"Retry-After": str(retry_after_s)} if status == 429 else None
        return cls(status, code, message, headers=headers)

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def invalid(exc: ValidationError) -> ApiError:
    """A 400 naming the first field that failed (as `param`) and every problem."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        problems.append(f"{where}: {str(err['msg']).removeprefix('Value error, ')}")
    first = exc.errors()[0]["loc"] if exc.errors() else ()
    return ApiError(400, "invalid_request", "; ".join(problems), param=str(first[0]) if first else None)


# ---- requests --------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat share; the neutral values of what Prism does not implement."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    user: str | None = Field(None, max_length=256)

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: Any) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("up to 4 stop sequences, none empty")
        return value

    @model_validator(mode="after")
    def _options_need_stream(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions. `prompt`: text or token ids, or a list of exactly one of either."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            if len(value) != 1:
                raise ValueError(f"one prompt per request, got {len(value)}")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value  # type: ignore[no-any-return]

    def prompt_input(self) -> str | list[int]:
        return self.prompt  # type: ignore[return-value]  # normalised by _one_prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions; `max_completion_tokens` is OpenAI's newer name of `max_tokens`."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: Literal[False] | None = None
    response_format: dict[str, Literal["text"]] | None = None

    def token_limit(self) -> int:
        """Tokens to generate at most: as asked, else until the context ends (the gating stops there)."""
        return self.max_completion_tokens or self.max_tokens or MAX_TOKENS_LIMIT


def parse_body(body: bytes, model: type[CompletionRequest] | type[ChatCompletionRequest]) -> Any:
    """The validated request, or ApiError 400 (not JSON, not an object, a field out of range)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc) from None


# ---- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish: FinishReason, use: dict[str, int]) -> dict[str, Any]:
    """A whole `text_completion` response."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": now(), "model": model, "choices": [choice],
            "usage": use}


def chat_completion(rid: str, model: str, text: str, finish: FinishReason, use: dict[str, int]) -> dict[str, Any]:
    """A whole `chat.completion` response."""
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion", "created": now(), "model": model, "choices": [choice],
            "usage": use}


def chunk(chat: bool, rid: str, model: str, text: str | None, finish: FinishReason | None,
          *, role: bool = False) -> dict[str, Any]:
    """One streamed chunk: a piece of text, the first chat chunk (`role`), or the last (`finish`)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": now(), "model": model, "choices": [choice]}


def piece_encoder(chat: bool, rid: str, model: str, include_usage: bool) -> Callable[[str], bytes]:
    """text → the SSE event of one text chunk, from a template made once per stream (the per-token path:
    only the text is serialised)."""
    marker = "\x00piece\x00"
    data = {**chunk(chat, rid, model, marker, None), **({"usage": None} if include_usage else {})}
    head, tail = sse(data).split(json.dumps(marker).encode())
    return lambda text: head + json.dumps(text).encode() + tail


def usage_chunk(chat: bool, rid: str, model: str, use: dict[str, int]) -> dict[str, Any]:
    """The extra last chunk of `stream_options.include_usage`: no choices, the usage."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": obj, "created": now(), "model": model, "choices": [], "usage": use}


def model_list(name: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "prism"}]}


def sse(data: dict[str, Any]) -> bytes:
    """One server-sent event carrying `data` as JSON."""
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
