"""What a user of one node sees: a request to `prism up --nodes 1` against the model in one process.

`prism up --nodes 1` (its defaults: two expert hosts, both embedded in the gating, together holding
every expert) serves the demo model; this process loads the same checkpoint as `prism run` does and
generates with `shared.model.generate`. Each round sends the same prompt, greedy, the same number of
tokens, to both, one after the other: the client-side time of a NATS request (connect once) against
`generate`'s time. Prints the medians, their ratio and where the request's time went on the gating
(its reply's `timings`).

    .venv/bin/python bench/one_node.py [--model DIR] [--rounds 25] [--max-tokens 32] [--threads N]

`--threads` sets this process's torch threads (default: torch's own, as `prism run` uses); `prism up`
gives its gating the machine's cores divided by its nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.hops import prism_up  # noqa: E402
from shared import subjects  # noqa: E402
from shared.nats_server import free_port  # noqa: E402

NODE = "node0"


Times = tuple[list[float], list[float], list[dict]]  # in one process (s), through Prism (s), the gating's timings


async def rounds(nc: nats.NATS, model_dir: Path, args: argparse.Namespace) -> Times:
    from cli.run import _load
    from shared.model.generate import generate
    from shared.model.sampling import SamplingParams

    model, experts = _load(model_dir, "fp32", "cpu")
    local, remote, timings = [], [], []
    for r in range(args.rounds + 2):  # the first two warm both sides up
        prompt = [5 + (j * 7 + r) % 200 for j in range(16)]
        started = time.perf_counter()
        expected = generate(model, experts, [prompt], args.max_tokens, SamplingParams())[0]
        took = time.perf_counter() - started
        started = time.perf_counter()
        body = json.dumps({"input_ids": prompt, "max_tokens": args.max_tokens}).encode()
        reply = json.loads((await nc.request(subjects.infer(NODE), body, timeout=60)).data)
        through = time.perf_counter() - started
        if reply.get("token_ids") != expected:
            raise SystemExit(f"round {r}: Prism answered {reply.get('token_ids')}, the model in one process {expected}")
        if r >= 2:
            local.append(took)
            remote.append(through)
            timings.append(reply["timings"])
    return local, remote, timings


async def measure(port: int, args: argparse.Namespace) -> Times:
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        return await rounds(nc, Path(args.model), args)
    finally:
        await nc.close()


def report(args: argparse.Namespace, times: Times) -> None:
    local, remote, timings = times
    med = statistics.median
    print(f"# one node — {platform.machine()}, {os.cpu_count()} cores, CPU, fp32, torch threads here "
          f"{torch.get_num_threads()}")
    print(f"model {Path(args.model).name}; prompt 16 tokens, {args.max_tokens} generated, greedy; {args.rounds} "
          "rounds, interleaved; answers equal token for token\n")
    print("| path | request ms p50 | vs in one process |")
    print("|---|---:|---:|")
    print(f"| the model in one process (`generate`, as `prism run`) | {1000 * med(local):.1f} | 1.00× |")
    print(f"| `prism up --nodes 1`, a NATS request (client-side) | {1000 * med(remote):.1f} | "
          f"{med(remote) / med(local):.2f}× |")
    parts = ", ".join(f"{key} {1000 * med(t[key] for t in timings):.1f}" for key in
                      ("queue_s", "prefill_s", "decode_s", "expert_wait_s", "local_experts_s", "total_s"))
    print(f"\nthe gating's timings, ms p50: {parts}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "demo"))
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads in this process (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    port = free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="prism-one-node-"))
    stack = prism_up(Path(args.model), port, run_dir, "--nodes", "1")  # returns once every node serves
    try:
        times = asyncio.run(measure(port, args))
    finally:
        stack.send_signal(signal.SIGTERM)
        stack.wait(timeout=60)
    report(args, times)


if __name__ == "__main__":
    main()
