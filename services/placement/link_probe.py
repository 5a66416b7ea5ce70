"""Each node's round trip to the hub, measured, so that plans are made for the links there are, not only
for the ones a topology file declares.

The placement service runs on the hub. Every `link_probe_s` it sends one `$SRV.PING` and times the
first answer from each node (service.py `_probe`): any of the node's services answers (a gating or an
expert host; nats.micro metadata `node`), and the answer crosses the node's link both ways. A sample is
never shorter than the link and is longer by whatever the answering process was doing (a decode step, a
wake on a busy machine), so a node's round trip is the smallest of its last WINDOW samples.

Every RATE_EVERY-th probe carries `rate_bytes` (32 KiB): it crosses each node's link once, hub to node,
so its round trips exceed the empty probes' by the time the link takes to carry it, and the rate is
`rate_bytes` over that difference. The difference is taken between the same low quantile (the 10th
percentile) of each kind over the same 5 minutes: a minimum depends on how many samples it is the minimum
of (30 loaded against 150 empty), and a pair's own empty probe is as noisy as the loaded one. On a loaded
3-node stack this gave the tightest estimates of the choices tried (docs/benchmarks.md). What it spends:
32 KiB per node every 10 s (26 kbit/s), and a message behind it waits for it once (0.5 ms at 500 Mbit/s).
The payload is random bytes: a leaf connection whose round trip exceeds 10 ms is S2-compressed by default
(nats-server's `s2_auto`), and 32 KiB of zeros crossed such a link as 95 bytes. Pure: no NATS here.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping

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

MOVED_CARRY_MS = 1.0
"""A rate has moved when the time its link takes for the rate payload moved by more than MOVED and by
more than this: below it (between links faster than ~250 Mbit/s) the difference is the software's noise
(a link without a limit measured 240 to 940 Mbit/s under load), and a 4 KB message's cost moves by
less than 0.15 ms."""

RATE_EVERY = 5
"""Every this many probes one carries the rate payload (every 10 s at the default period)."""

RATE_BYTES = 32 * 1024
"""The rate payload: 0.5 ms at 500 Mbit/s, 13 ms at 20; long enough to stand out of the quantiles' noise
(0.1-0.3 ms), short enough that the message it delays waits little."""

UNLIMITED_MBIT = 100_000.0
"""A measured rate above this is no limit at all (the payload took no measurable time): unlimited."""


def links_moved(
    published: Mapping[str, LinkSpec], measured: Mapping[str, LinkSpec], rate_bytes: int = RATE_BYTES
) -> bool:
    """True when some node's measured delay, or the time its link takes to carry `rate_bytes`, is no
    longer the published one (beyond noise)."""
    def moved(a: float, b: float, floor_ms: float = MOVED_MS) -> bool:
        return abs(a - b) > max(MOVED * max(a, b), floor_ms)

    def carry_ms(link: LinkSpec) -> float:
        return 0.0 if link.rate_mbit is None else 8e-3 * rate_bytes / link.rate_mbit

    return any(
        moved(published[node].delay_ms, link.delay_ms)
        or moved(carry_ms(published[node]), carry_ms(link), MOVED_CARRY_MS)
        for node, link in measured.items()
    )


class LinkProbe:
    """The measured round trips of `nodes` (empty probes, and ones carrying `rate_bytes`), and the
    links they make."""

    def __init__(
        self, nodes: list[str], window: int = WINDOW, min_samples: int = MIN_SAMPLES, rate_bytes: int = RATE_BYTES
    ) -> None:
        self.min_samples = min_samples
        self.rate_bytes = rate_bytes
        self._samples: dict[str, deque[float]] = {node: deque(maxlen=window) for node in nodes}
        loaded_window = max(2 * min_samples, window // RATE_EVERY)  # the same span of time
        self._loaded: dict[str, deque[float]] = {node: deque(maxlen=loaded_window) for node in nodes}

    def loaded(self, probe: int) -> bool:
        """Whether the `probe`-th probe (counting from 0) carries the `rate_bytes` payload: every
        RATE_EVERY-th, when measuring rates."""
        return self.rate_bytes > 0 and probe % RATE_EVERY == RATE_EVERY - 1

    def add(self, node: str, rtt_s: float, loaded: bool = False) -> None:
        """One answer of `node`, `rtt_s` after a probe (`loaded`: one that carried the payload)."""
        if node in self._samples:
            (self._loaded if loaded else self._samples)[node].append(rtt_s)

    def rtt_s(self) -> dict[str, float]:
        """node → its measured round trip to the hub, seconds (nodes with fewer samples than
        `min_samples` are left out)."""
        return {node: min(samples) for node, samples in self._samples.items() if len(samples) >= self.min_samples}

    def rate_mbit(self) -> dict[str, float | None]:
        """node → its measured rate hub to node, Mbit/s, 3 significant digits; None: no limit measurable
        (nodes without `min_samples` empty and twice that loaded probes are left out)."""
        out: dict[str, float | None] = {}
        for node, loaded in self._loaded.items():
            empty = self._samples[node]
            if len(empty) >= self.min_samples and len(loaded) >= 2 * self.min_samples:  # 1st minute: start-up's
                extra_s = _low(loaded) - _low(empty)
                mbit = 8e-6 * self.rate_bytes / extra_s if extra_s > 0 else math.inf
                out[node] = float(f"{mbit:.3g}") if mbit <= UNLIMITED_MBIT else None
        return out

    def links(self, configured: Mapping[str, LinkSpec]) -> dict[str, LinkSpec]:
        """`configured` with each measured node's one-way delay replaced by half its round trip, and its
        rate by the measured one."""
        delays, rates = self.rtt_s(), self.rate_mbit()
        return {
            node: LinkSpec(
                delay_ms=round(500 * delays[node], 4) if node in delays else link.delay_ms,
                rate_mbit=rates.get(node, link.rate_mbit),
            )
            for node, link in configured.items()
        }


def _low(samples: Iterable[float]) -> float:
    """The 10th percentile (the smallest of fewer than 11)."""
    ordered = sorted(samples)
    return ordered[len(ordered) // 10]


def node_of(payload: bytes) -> str | None:
    """The `node` of a nats.micro PING answer's metadata (None for hub services and what is not one)."""
    try:
        answer = load_json(payload, "ping answer")
    except InvalidJSON:  # the server's no-responders status (empty)
        return None
    metadata = answer.get("metadata") if isinstance(answer, dict) else None
    node = metadata.get("node") if isinstance(metadata, dict) else None
    return node if isinstance(node, str) else None
