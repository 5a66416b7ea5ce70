"""Settings of the placement service (env prefix PRISM_PLACEMENT_, or --flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from services.placement.types import PolicyName
from shared import subjects
from shared.dtypes import DtypeName
from shared.settings import WatchesHosts
from shared.topology import LinkSpec, NodeLink

HEADER_ROOM_BYTES = 4096
"""What a message needs beside its payload (subject, reply inbox, headers), well within this."""


class PlacementSettings(WatchesHosts):
    model_config = SettingsConfigDict(env_prefix="PRISM_PLACEMENT_", frozen=True, extra="forbid", cli_kebab_case=True)

    nodes: str = Field(
        "node0", pattern=r"^[A-Za-z0-9_-]{1,64}(,[A-Za-z0-9_-]{1,64})*$", description="node names, comma-separated"
    )
    model: Path = Field(Path("models/demo"), description="checkpoint directory (layers, experts, expert size)")
    policy: PolicyName = Field("prism", description="placement policy")
    dtype: DtypeName = Field("float32", description="dtype of the experts on the hosts (sizes their slots)")
    plan_interval_s: float = Field(10.0, ge=0.1, le=86400, description="period of re-planning, seconds")
    migration_cost_calls: float = Field(
        50.0, ge=0, le=1e12, description="cost of loading one expert, in remote (token, expert) calls"
    )
    min_gain: float = Field(
        0.05, ge=0, lt=1, description="share of its expected latency a `latency` plan must save to be applied"
    )
    rtt_ms: float = Field(4.0, ge=0, le=10000, description="round trip between nodes not in `links`, milliseconds")
    bandwidth_mbit: float = Field(500.0, gt=0, le=1e6, description="bandwidth between nodes not in `links`, Mbit/s")
    links: list[NodeLink] = Field(
        default_factory=list,
        description="each node's link to the hub, as JSON: [{node, delay_ms, rate_mbit}] (one way; the topology's)",
    )
    link_probe_s: float = Field(
        2.0, ge=0, le=3600,
        description="period of timing each node's round trip to the hub, s (0: plan with the configured links only)",
    )
    link_rate_bytes: int = Field(
        32 * 1024, ge=0, le=1 << 20,
        description="payload of every 5th probe, whose extra time gives each node's rate, bytes (0: configured rates)",
    )
    migration_timeout_s: float = Field(
        120.0, gt=0, le=86400, description="wait this long for hosts to hold a new plan before planning again, s"
    )
    plans_bucket: str = Field(subjects.KV_PLACEMENT, description="KV bucket of the plan (key 'plan')")
    hosts_bucket: str = Field(subjects.KV_HOSTS, description="KV bucket of live hosts (TTL = host_ttl_s)")
    min_window_tokens: int = Field(256, ge=0, le=10**9, description="tokens a window needs before re-planning")
    load_horizon_s: float = Field(
        60.0, gt=0, le=86400, description="the measured traffic the policies plan with covers this many seconds"
    )

    @field_validator("link_rate_bytes")
    @classmethod
    def _rate_payload_fits(cls, size: int, info: ValidationInfo) -> int:
        """The rate probe is one message: it must fit the server's max_payload (with room for headers)."""
        limit = int(info.data.get("max_payload_bytes", size)) - HEADER_ROOM_BYTES
        if size > limit:
            raise ValueError(f"must fit in one message: at most max_payload_bytes - {HEADER_ROOM_BYTES} ({limit})")
        return size

    @field_validator("links")
    @classmethod
    def _links_follow_nodes(cls, links: list[NodeLink], info: ValidationInfo) -> list[NodeLink]:
        """The gatings break ties between equally near nodes by the links' order, the plan by `nodes`'."""
        nodes = str(info.data.get("nodes", "")).split(",")
        named = [link.node for link in links]
        if unknown := sorted(set(named) - set(nodes)):
            raise ValueError(f"names nodes that `nodes` does not: {', '.join(unknown)}")
        if named != [n for n in nodes if n in named]:
            raise ValueError(f"must list their nodes in the order of `nodes` ({','.join(nodes)})")
        return links

    def node_list(self) -> list[str]:
        return self.nodes.split(",")

    def node_links(self) -> dict[str, LinkSpec]:
        """Each node's link to the hub: its own from `links`, else one that makes the round trip between
        two such nodes rtt_ms (a star: rtt = 2 × (delay_a + delay_b)) at bandwidth_mbit."""
        given = {link.node: LinkSpec(delay_ms=link.delay_ms, rate_mbit=link.rate_mbit) for link in self.links}
        default = LinkSpec(delay_ms=self.rtt_ms / 4, rate_mbit=self.bandwidth_mbit)
        return {node: given.get(node, default) for node in self.node_list()}
