"""Settings of the HTTP API service (env prefix PRISM_API_, or --flags)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from shared.settings import ServiceSettings


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class ApiSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="PRISM_API_", frozen=True, extra="forbid", cli_kebab_case=True)

    host: str = Field("127.0.0.1", min_length=1, max_length=253, description="address the HTTP server binds")
    port: int = Field(8000, ge=1, le=65535, description="TCP port of the HTTP server")
    key: SecretStr | None = Field(
        None, min_length=16, max_length=512,
        description="API key clients send as 'Authorization: Bearer <key>'; required when host is not loopback",
    )
    model: Path = Field(Path("models/demo"), description="checkpoint directory: tokenizer and chat template")
    model_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._:/-]{1,128}$", description="model id clients name (default: the directory's name)"
    )
    node: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="node to ask when the request has no X-Prism-Node header (default: the least-loaded gating)",
    )
    request_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="longest wait for a gating's next message (first token included), seconds"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20, description="largest request body (else 413), bytes")
    retry_after_s: int = Field(1, ge=0, le=3600, description="Retry-After of a 429 (node overloaded), seconds")
    stats_interval_s: float = Field(
        1.0, gt=0, le=3600, description="period of reading the gatings' load ($SRV.STATS), seconds"
    )
    stats_wait_s: float = Field(0.25, gt=0, le=60, description="how long one load reading collects answers, seconds")

    @model_validator(mode="after")
    def _key_off_loopback(self) -> ApiSettings:
        if self.key is None and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not loopback: set an API key (PRISM_API_KEY, at least 16 characters) "
                "or bind 127.0.0.1"
            )
        return self

    def served_name(self) -> str:
        """The model id of /v1/models and of every response."""
        return self.model_name or self.model.resolve().name
