"""What Prometheus metrics cost a gating: one scrape of its registry, and observing one finished request.

Builds a real gating of the demo model (no NATS connection is opened: `build` does no I/O) with its
experts in N embedded hosts, observes R finished requests into its metrics, then times
- `generate_latest(registry)`: the event-loop time of one scrape (collectors read the engine, the
  dispatch counters, every embedded host's status and the connection's stats), and the bytes served;
- one scrape over HTTP on loopback (MetricsServer, the same loop), request to last byte;
- `RequestMetrics.finished` (3 histograms, 3 counters), per request,
each as the median of `--repeat` runs, against the time of one decode step of the same gating's model
at batch 1 (in-process experts), measured in the same run.

    .venv/bin/python bench/metrics.py [--model DIR] [--hosts 2] [--repeat 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from nats.aio.client import Client
from prometheus_client import generate_latest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.gating.service import build  # noqa: E402
from services.gating.settings import GatingSettings  # noqa: E402
from shared.metrics_http import MetricsServer  # noqa: E402
from shared.model.generate import generate  # noqa: E402
from shared.model.model import MoEModel  # noqa: E402
from shared.model.moe import LocalExperts  # noqa: E402
from shared.model.sampling import SamplingParams  # noqa: E402


def median_s(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def http_scrape_s(registry: object, repeat: int) -> float:
    server = MetricsServer(registry)  # type: ignore[arg-type]
    port = await server.start()
    times = []
    try:
        for _ in range(repeat):
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.read()
            writer.close()
            times.append(time.perf_counter() - started)
    finally:
        await server.close()
    return statistics.median(times)


def decode_step_s(model_dir: Path, steps: int = 32) -> float:
    model, experts = MoEModel.from_checkpoint(model_dir), LocalExperts.from_checkpoint(model_dir)
    with torch.inference_mode():
        generate(model, experts, [[5, 6, 7, 8]], 4, SamplingParams())  # warm-up
        started = time.perf_counter()
        generate(model, experts, [[5, 6, 7, 8]], steps, SamplingParams())
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--hosts", type=int, default=2, help="embedded hosts sharing the experts")
    parser.add_argument("--requests", type=int, default=1000, help="finished requests observed before timing")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    experts = 32  # the demo model's experts per layer, split evenly over the hosts
    share = experts // args.hosts
    hosts = [{"host": f"e{i}", "experts": f"*:{i * share}-{(i + 1) * share - 1}"} for i in range(args.hosts)]
    gating = build(Client(), GatingSettings(model=args.model, embedded_hosts=hosts))
    for i in range(args.requests):
        gating.metrics.finished("length", 16, 32, 0.01 + i * 1e-5, 0.5 + i * 1e-4)
    scrape_s = median_s(lambda: generate_latest(gating.registry), args.repeat)
    body = generate_latest(gating.registry)
    observe_s = median_s(lambda: gating.metrics.finished("length", 16, 32, 0.02, 0.6), args.repeat * 10)
    http_s = asyncio.run(http_scrape_s(gating.registry, args.repeat))
    step_s = decode_step_s(args.model)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"torch {torch.__version__}, 1 thread; model {args.model.name}; {args.hosts} embedded hosts; "
          f"median of {args.repeat} runs")
    print(f"{'what':<44} {'time':>12} {'vs one decode step':>20}")
    print("-" * 78)
    rows = [("one scrape, generate_latest (loop time)", scrape_s), ("one scrape over HTTP, loopback", http_s),
            ("observe one finished request", observe_s), ("one decode step, batch 1, in-process", step_s)]
    for what, seconds in rows:
        print(f"{what:<44} {seconds * 1e3:>9.3f} ms {seconds / step_s:>19.3f}x")
    lines = len(body.splitlines())
    print(f"scrape body: {len(body)} bytes, {lines} lines")


if __name__ == "__main__":
    main()
