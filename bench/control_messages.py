"""What the control plane's periodic messages cost, for real models' shapes: a host's heartbeat (every
second, to every gating): its bytes, the host's time to build and encode it, and a gating's time to take
it in, on its event loop, each host holding `--share` of the routed experts at random, the experts
unchanged since its last heartbeat and its counters moved, as between two heartbeats of a serving host;
and a gating's activation report (every 2 s, to the placement service) of a window at batch 8 with
uniform routing: its bytes.

Now (`experts` as one hex mask per layer, `shared/schemas.HostStatus`) against before 2026-12-08,
rebuilt here: the same status with `experts` as a list of [layer, expert] pairs that pydantic checks
pair by pair. Both through the gating's `HostDirectory.on_status` (given the rebuilt class for before).
Reports now (counts in the smallest integer type that holds them) against before (int64 counts).

    .venv/bin/python bench/control_messages.py [--share 0.3] [--repeat 50]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import msgpack
import numpy as np
from pydantic import ConfigDict, create_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.metrics import median_s
from services.gating import directory as directory_module
from services.gating.directory import HostDirectory
from shared.activations import ActivationReport
from shared.schemas import HostStatus

SHAPES = {  # MoE layers, routed experts per layer, top-k (their config.json)
    "Mixtral-8x7B": (32, 8, 2),
    "DeepSeek-V2-Lite": (26, 64, 6),
    "Qwen3-30B-A3B": (48, 128, 8),
    "Qwen3-235B-A22B": (94, 128, 8),
    "DeepSeek-V3": (58, 256, 8),
}
REPORT_WINDOW_S, STEPS_PER_S, BATCH = 2.0, 20, 8

PairsStatus: Any = create_model(  # the heartbeat before: experts as pairs
    "PairsStatus",
    __config__=ConfigDict(frozen=True, extra="forbid"),
    experts=(list[tuple[int, int]], ...),
    **{name: (f.annotation, f) for name, f in HostStatus.model_fields.items() if name != "experts"},
)


def median_ms(fn: Callable[[int], object], repeat: int) -> float:
    """fn(i) for i in 1..repeat (the counters move between heartbeats); the median ms."""
    turn = itertools.count(1)
    return 1000 * median_s(lambda: fn(next(turn)), repeat)


def host_fields(layers: int, experts: int, share: float, seed: int) -> dict[str, Any]:
    held = random.Random(seed).sample([(layer, e) for layer in range(layers) for e in range(experts)],
                                      round(share * layers * experts))
    return {"host": "edge-b-gpu0", "node": "edge-b", "device": "cuda:0", "memory_used_bytes": 1 << 30,
            "memory_limit_bytes": 1 << 31, "experts": tuple(sorted(held)), "queue_depth": 0, "calls_served": 0,
            "tokens_served": 0, "errors": 0}


def now(fields: dict[str, Any], repeat: int) -> tuple[int, float, float]:
    """(bytes, host ms, gating ms) in today's format, through today's code."""
    beat = [HostStatus(**{**fields, "calls_served": n}).model_dump_json().encode() for n in (0, 1)]
    build = median_ms(lambda n: HostStatus(**{**fields, "calls_served": n}).model_dump_json(), repeat)
    directory = HostDirectory("edge-a")
    directory.on_status(beat[0])
    return len(beat[0]), build, median_ms(lambda n: directory.on_status(beat[n % 2]), repeat)


def before(fields: dict[str, Any], repeat: int) -> tuple[int, float, float]:
    """The same with the experts as a list of pairs (the host sorted its keys into a list each time)."""
    def build(n: int) -> bytes:
        return PairsStatus(**{**fields, "experts": sorted(fields["experts"]), "calls_served": n}).model_dump_json()

    beat = [build(n).encode() for n in (0, 1)]
    with mock.patch.object(directory_module, "HostStatus", PairsStatus):
        directory = HostDirectory("edge-a")
        directory.on_status(beat[0])
        take = median_ms(lambda n: directory.on_status(beat[n % 2]), repeat)
    return len(beat[0]), median_ms(build, repeat), take


def report_bytes(layers: int, experts: int, top_k: int) -> tuple[int, int]:
    """(bytes now, bytes before) of one activation report: a window's choices drawn uniformly."""
    tokens = int(REPORT_WINDOW_S * STEPS_PER_S * BATCH)
    rng = np.random.default_rng(layers * experts)
    counts = np.stack([rng.multinomial(tokens * top_k, [1 / experts] * experts) for _ in range(layers)])
    report = ActivationReport("edge-a", REPORT_WINDOW_S, list(range(layers)), counts, np.full(layers, tokens))
    now = report.encode()
    before = msgpack.unpackb(now)  # as gatings wrote it: int64 counts, no type named
    before.pop("count_dtype")
    before["counts"] = counts.astype("<i8").tobytes()
    return len(now), len(msgpack.packb(before))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--share", type=float, default=0.3, help="share of the routed experts each host holds")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    print(f"# control-plane messages — {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; a host holding {args.share:.0%} of the routed experts; "
          f"ms: median of {args.repeat}\n")
    print("| model (MoE layers × experts) | experts held | heartbeat bytes: now | before | host builds and encodes, "
          "ms: now | before | a gating takes it in, ms: now | before | before / now | activation report bytes: now "
          "| before |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (layers, experts, top_k) in SHAPES.items():
        fields = host_fields(layers, experts, args.share, seed=layers * experts)
        (size, build, take), (old_size, old_build, old_take) = now(fields, args.repeat), before(fields, args.repeat)
        report, old_report = report_bytes(layers, experts, top_k)
        print(f"| {name} ({layers} × {experts}) | {len(fields['experts'])} | {size} | {old_size} | {build:.3f} | "
              f"{old_build:.3f} | {take:.3f} | {old_take:.3f} | {old_take / take:.0f}× | {report} | {old_report} |",
              flush=True)


if __name__ == "__main__":
    main()
