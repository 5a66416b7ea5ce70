"""Each node's round trip to the hub, measured, so that plans are made for the links there are, not only
for the ones a topology file declares.

The placement service runs on the hub. Every `link_probe_s` it sends one `$SRV.PING` and times the
first answer from each node (service.py `_probe`): any of the node's services answers (a gating or an
expert host; nats.micro metadata `node`), and the answer crosses the node's link both ways. A sample is
never shorter than the link and is longer by whatever the answering process was doing (a decode step, a
wake on a busy machine), so a node's round trip is the smallest of its last WINDOW samples. The rate is
not measured: it stays the configured one (timing a rate would spend it). Pure: no NATS here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from shared.errors import InvalidJSON
from shared.schemas import load_json
from shared.topology import LinkSpec

WINDOW = 150
"""Samples per node the round trip is the minimum of: 5 minutes at the default period of 2 s, long
enough to hold a quiet moment of a busy node (a link that gets slower is seen that much later)."""

MIN_SAMPLES = 5
"""Samples a node needs before its measurement replaces the configured link (a start-up is noisy)."""

PROBE_WAIT_S = 1.0
"""How long one probe waits for the nodes' answers: a node slower than that keeps its configured link."""


MOVED = 0.2
"""A node's measured delay has moved when it differs from the published one by more than this share
(and by more than MOVED_MS): the links are published again."""

MOVED_MS = 0.1


def links_moved(published: Mapping[str, LinkSpec], measured: Mapping[str, LinkSpec]) -> bool:
    """True when some node's measured delay is no longer the published one (beyond noise)."""
    def moved(a: float, b: float) -> bool:
        return abs(a - b) > max(MOVED * max(a, b), MOVED_MS)

    return any(moved(published[node].delay_ms, link.delay_ms) for node, link in measured.items())


class LinkProbe:
    """The measured round trips of `nodes`, and the links they make."""

    def __init__(self, nodes: list[str], window: int = WINDOW, min_samples: int = MIN_SAMPLES) -> None:
        self.min_samples = min_samples
        self._samples: dict[str, deque[float]] = {node: deque(maxlen=window) for node in nodes}

    def add(self, node: str, rtt_s: float) -> None:
        if node in self._samples:
            self._samples[node].append(rtt_s)

    def rtt_s(self) -> dict[str, float]:
        """node → its measured round trip to the hub, seconds (nodes with fewer samples than
        `min_samples` are left out)."""
        return {node: min(samples) for node, samples in self._samples.items() if len(samples) >= self.min_samples}

    def links(self, configured: Mapping[str, LinkSpec]) -> dict[str, LinkSpec]:
        """`configured` with each measured node's one-way delay replaced by half its round trip."""
        measured = self.rtt_s()
        return {
            node: link if node not in measured else LinkSpec(delay_ms=round(500 * measured[node], 4),
                                                             rate_mbit=link.rate_mbit)
            for node, link in configured.items()
        }


def node_of(payload: bytes) -> str | None:
    """The `node` of a nats.micro PING answer's metadata (None for hub services and what is not one)."""
    try:
        answer = load_json(payload, "ping answer")
    except InvalidJSON:  # the server's no-responders status (empty)
        return None
    metadata = answer.get("metadata") if isinstance(answer, dict) else None
    node = metadata.get("node") if isinstance(metadata, dict) else None
    return node if isinstance(node, str) else None
