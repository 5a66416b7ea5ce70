"""Settings of one gating service (env prefix PRISM_GATING_, or --flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import SettingsConfigDict

from shared import subjects
from shared.dtypes import DtypeName
from shared.settings import Computes, WatchesHosts
from shared.topology import NodeLink


class EmbeddedHost(BaseModel):
    """An expert host that lives in the gating's process: the experts of one of the node's own devices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="unique host name")
    experts: str = Field("", description="experts it starts with: LAYERS:EXPERTS items, e.g. '1-3:0-7,5:*'")
    memory_limit_mb: float = Field(4096.0, gt=0, le=2**24, description="memory budget for expert weights, MiB")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device of its experts")
    speed: float = Field(1.0, gt=0, le=1000, description="relative compute speed (placement input), 1.0 = reference")


class GatingSettings(WatchesHosts, Computes):
    model_config = SettingsConfigDict(env_prefix="PRISM_GATING_", frozen=True, extra="forbid", cli_kebab_case=True)

    node: str = Field("node0", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="node (edge server) this gating serves")
    model: Path = Field(Path("models/demo"), description="checkpoint directory (dense part and tokenizer)")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device of the dense model")
    dtype: DtypeName = Field("float32", description="dense model dtype")
    max_batch: int = Field(32, ge=1, le=1024, description="sequences decoded together (KV cache slots)")
    max_context: int = Field(1024, ge=8, le=131072, description="prompt plus generated tokens per request")
    max_queue: int = Field(256, ge=1, le=100000, description="requests waiting for a slot before 'overloaded'")
    expert_timeout_s: float = Field(2.0, gt=0, le=120, description="wait for one expert answer, seconds")
    activation_interval_s: float = Field(2.0, gt=0, le=3600, description="period of activation reports, seconds")
    host_messages: bool = Field(
        True, description="send one message per holding host and layer (from host heartbeats), not one per expert"
    )
    links: list[NodeLink] = Field(
        default_factory=list,
        description="each node's link to the hub, as JSON: [{node, delay_ms, rate_mbit}] (one way; the topology's): "
        "which holder of a remote expert is nearest",
    )
    embedded_hosts: list[EmbeddedHost] = Field(
        default_factory=list,
        description="expert hosts in this process, as JSON: [{host, experts, memory_limit_mb, device, speed}]",
    )
    route: list[str] = Field(
        default_factory=list,
        description="a fixed executing node per layer for this node's requests, as JSON (empty: the plan's route)",
    )
    plans_bucket: str = Field(subjects.KV_PLACEMENT, description="KV bucket of the plan (key 'plan'), for routes")
    max_foreign: int = Field(
        32, ge=1, le=1024, description="other nodes' requests whose route segments run here at once"
    )
    foreign_ttl_s: float = Field(
        60.0, ge=1, le=3600, description="free a foreign request's KV after this long without a segment, seconds"
    )
    route_retry_s: float = Field(
        10.0, gt=0, le=3600, description="after a route breaks, new requests stay home this long, seconds"
    )
