"""Every NATS subject, MQTT topic and JetStream store name Prism uses, built in one place.

One function per family, most general token first (`prism.v1.<family>.<...>`). Tokens are
validated so a node or host name can never inject wildcards or extra levels.
"""

from __future__ import annotations

import re

VERSION = "v1"
ROOT = f"prism.{VERSION}"

EXPERT_QUEUE = "prism-experts"
"""Queue group of every expert subscription: NATS picks one holder, preferring the local leaf."""

# nats.micro service names: `$SRV.PING|INFO|STATS.<name>` finds them (prism status, prism up's readiness)
SERVICE_GATING = "prism-gating"
SERVICE_HOST = "prism-expert-host"
SERVICE_PLACEMENT = "prism-placement"
SERVICE_MIGRATOR = "prism-migrator"

KV_PLACEMENT = "prism_placement"
KV_PLAN_KEY = "plan"  # shared.schemas.Plan
KV_LINKS_KEY = "links"  # each node's link to the hub the plans are made for (measured): [{node, delay_ms, rate_mbit}]
KV_HOSTS = "prism_hosts"
OBJECT_WEIGHTS = "prism_weights"
JETSTREAM_DOMAIN = "hub"

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # node, host and MQTT client names: one subject token
_TOKEN = re.compile(NAME_PATTERN)


def is_token(value: object) -> bool:
    """True for a string that is a safe single subject token."""
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def check_token(value: str, what: str = "name") -> str:
    """Return `value` if it is a safe single subject token, else raise ValueError."""
    if not is_token(value):
        raise ValueError(f"{what} {value!r} is not a valid name: use 1-64 of A-Z a-z 0-9 _ -")
    return value


def infer(node: str) -> str:
    """Inference requests for one node (public contract)."""
    return f"{ROOT}.infer.{check_token(node, 'node')}"


def cancel(node: str) -> str:
    """Cancel requests running on one node (public contract): JSON `{"reply_to": subject}` stops every
    request of that node whose replies go to `subject`. Under `infer.<node>` so that whoever may ask a
    node may also cancel what it asked."""
    return f"{infer(node)}.cancel"


def reply(client_id: str) -> str:
    """Replies to an MQTT client; MQTT sees it as `prism/v1/reply/<client_id>`."""
    return f"{ROOT}.reply.{check_token(client_id, 'client_id')}"


def expert(layer: int, expert_index: int) -> str:
    """Expert calls for one routed expert; served by any holder in queue group EXPERT_QUEUE."""
    if layer < 0 or expert_index < 0:
        raise ValueError(f"layer and expert must be >= 0, got {layer}, {expert_index}")
    return f"{ROOT}.expert.{layer}.{expert_index}"


def parse_expert(subject: str) -> tuple[int, int]:
    """Inverse of `expert`: `prism.v1.expert.3.17` -> (3, 17)."""
    prefix = f"{ROOT}.expert."
    if not subject.startswith(prefix):
        raise ValueError(f"not an expert subject: {subject!r}")
    layer, _, index = subject[len(prefix) :].partition(".")
    return int(layer), int(index)


def activations(node: str) -> str:
    return f"{ROOT}.activations.{check_token(node, 'node')}"


ALL_ACTIVATIONS = f"{ROOT}.activations.*"


def host_cmd(host: str) -> str:
    return f"{ROOT}.host.{check_token(host, 'host')}.cmd"


def host_calls(host: str) -> str:
    """Expert calls for several experts of one layer to one host (one message instead of one per expert)."""
    return f"{ROOT}.host.{check_token(host, 'host')}.calls"


def host_status(host: str) -> str:
    return f"{ROOT}.host.{check_token(host, 'host')}.status"


ALL_HOST_STATUS = f"{ROOT}.host.*.status"


def route_segment(node: str) -> str:
    """Request: hidden states of a route's segment for `node` to execute (the reply goes to the home
    node, forwarded along the chain, see services/gating/segments.py)."""
    return f"{ROOT}.route.{check_token(node, 'node')}.segment"


def route_release(node: str) -> str:
    """Publish: sequences whose home finished them; `node` frees their KV of the layers it ran."""
    return f"{ROOT}.route.{check_token(node, 'node')}.release"


PLACEMENT_CMD = f"{ROOT}.placement.cmd"
"""Request/reply: `{"kind": "replan"}` makes the placement service plan now (answers epoch, published)."""

PLAN_EVENTS = f"{ROOT}.plan.applied"
"""The migrator publishes here when an epoch's plan is applied (or refused), as JSON."""


def mqtt_infer_topic(node: str) -> str:
    """The MQTT topic IoT devices publish requests to; the broker maps it onto `infer(node)`."""
    return f"prism/{VERSION}/infer/{check_token(node, 'node')}"


def mqtt_reply_topic(client_id: str) -> str:
    return f"prism/{VERSION}/reply/{check_token(client_id, 'client_id')}"
