"""Settings every service shares. Each service subclasses `ServiceSettings` with its own env prefix.

Values come from (highest first) CLI flags, environment variables (`PRISM_<SERVICE>_<FIELD>`), defaults.
"""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound="ServiceSettings")


class ServiceSettings(BaseSettings):
    # allow_inf_nan: a NaN timeout would fail its bounds with a message about the bound, not the NaN
    model_config = SettingsConfigDict(frozen=True, extra="forbid", cli_kebab_case=True, allow_inf_nan=False)

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server the service connects to")
    nats_user: str | None = Field(None, description="user name, where the server requires credentials")
    nats_password: str | None = Field(None, description="password for nats_user")
    max_payload_bytes: int = Field(
        8 * 1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024, description="the server's max_payload, bytes"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log threshold")
    log_format: Literal["auto", "console", "json"] = Field("auto", description="auto: console on a terminal")
    drain_timeout_s: float = Field(5.0, gt=0, le=120, description="bound on draining at shutdown, seconds")
    metrics_port: int = Field(0, ge=0, le=65535, description="TCP port of Prometheus /metrics (0: off)")
    metrics_bind: str = Field(
        "127.0.0.1", min_length=1, max_length=253, description="address /metrics listens on (loopback unless set)"
    )


DEFAULT_HOST_TTL_S = 5.0


class WatchesHosts(ServiceSettings):
    """Settings of a service that follows host heartbeats (gating, placement, migrator): one meaning
    of "a host is gone" for all of them. At least 1 s: hosts beat every second by default."""

    host_ttl_s: float = Field(
        DEFAULT_HOST_TTL_S, ge=1, le=3600, description="a host without a heartbeat this long is gone, seconds"
    )


class Computes(ServiceSettings):
    """Settings of a service that computes experts or layers (gating, expert host): small work (a decode
    step's, a small message's) computes on the event loop, where a thread hop costs more than the math and
    OpenMP's fork and join more than a second core saves; big work on a worker thread
    (shared/model/inference.py `use_threads`)."""

    inline_max_tokens: int = Field(
        64, ge=0, le=1_000_000, description="steps or messages of at most this many tokens compute on the event loop"
    )
    inline_threads: int = Field(1, ge=1, le=64, description="torch intra-op threads for those, on the event loop")
    compute_threads: int = Field(1, ge=1, le=64, description="torch intra-op threads for bigger ones, on a worker")


def from_cli(cls: type[S], argv: list[str] | None = None) -> S:
    """Build settings from the environment, overridden by `--field value` flags."""
    if argv is None:
        return cls(_cli_parse_args=True)  # type: ignore[call-arg]
    return cls(_cli_parse_args=argv)  # type: ignore[call-arg]
