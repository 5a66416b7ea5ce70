"""What a user of one node sees: a request to `prism up --nodes 1` against the model in one process.

`prism up --nodes 1` (its defaults: two expert hosts, both embedded in the gating, together holding
every expert) serves the demo model; this process loads the same checkpoint as `prism run` does and
generates with `shared.model.generate`, on torch's default threads (as `prism run`) and on one (the
gating decodes on one, `INLINE_THREADS`). Each round sends the same prompt, greedy, the same number of
tokens, to the three, one after the other: the client-side time of a NATS request (connect once)
against `generate`'s times. Prints the medians, the ratios and where the request's time went on the
gating (its reply's `timings`).

    .venv/bin/python bench/one_node.py [--model DIR] [--rounds 25] [--max-tokens 32]
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
from dataclasses import dataclass, field
from pathlib import Path

import nats
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.hops import prism_up  # noqa: E402
from shared import subjects  # noqa: E402
from shared.nats_server import free_port  # noqa: E402

NODE = "node0"


DEFAULT_THREADS = torch.get_num_threads()


@dataclass
class Times:
    local: dict[int, list[float]] = field(default_factory=dict)  # torch threads -> `generate`'s seconds
    prism: list[float] = field(default_factory=list)  # a request through Prism, client-side seconds
    timings: list[dict[str, float]] = field(default_factory=list)  # the gating's, from each reply


async def rounds(nc: nats.NATS, model_dir: Path, args: argparse.Namespace) -> Times:
    from cli.run import _load
    from shared.model.generate import generate
    from shared.model.sampling import SamplingParams

    model, experts = _load(model_dir, "fp32", "cpu")
    times = Times()
    paths: list[int | None] = [*dict.fromkeys((DEFAULT_THREADS, 1)), None]  # torch threads in this process; None: Prism
    for r in range(args.rounds + 2):  # the first two warm every path up
        prompt = [5 + (j * 7 + r) % 200 for j in range(16)]
        answers, took, reply = [], {}, {}
        turn = r % len(paths)
        for threads in paths[turn:] + paths[:turn]:  # each path first, second and last in turn
            started = time.perf_counter()
            if threads is None:
                body = json.dumps({"input_ids": prompt, "max_tokens": args.max_tokens}).encode()
                reply = json.loads((await nc.request(subjects.infer(NODE), body, timeout=60)).data)
                answers.append(reply.get("token_ids"))
            else:
                torch.set_num_threads(threads)
                answers.append(generate(model, experts, [prompt], args.max_tokens, SamplingParams())[0])
            took[threads] = time.perf_counter() - started
        if any(answer != answers[0] for answer in answers):
            raise SystemExit(f"round {r}: the answers differ: {answers}")
        if r >= 2:
            for threads, seconds in took.items():
                if threads is None:
                    times.prism.append(seconds)
                else:
                    times.local.setdefault(threads, []).append(seconds)
            times.timings.append(reply["timings"])
    return times


async def measure(port: int, args: argparse.Namespace) -> Times:
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        return await rounds(nc, Path(args.model), args)
    finally:
        await nc.close()


def report(args: argparse.Namespace, times: Times) -> None:
    med = statistics.median
    print(f"# one node — {platform.machine()}, {os.cpu_count()} cores, CPU, fp32")
    print(f"model {Path(args.model).name}; prompt 16 tokens, {args.max_tokens} generated, greedy; {args.rounds} "
          "rounds, interleaved; answers equal token for token\n")
    fastest = min(med(seconds) for seconds in times.local.values())
    print("| path | request ms p50 | vs the fastest in one process |")
    print("|---|---:|---:|")
    for threads, seconds in times.local.items():
        name = "torch's default" if threads == DEFAULT_THREADS else "one"
        print(f"| the model in one process (`generate`), {name} ({threads}) thread(s) | {1000 * med(seconds):.1f} | "
              f"{med(seconds) / fastest:.2f}× |")
    print(f"| `prism up --nodes 1`, a NATS request (client-side) | {1000 * med(times.prism):.1f} | "
          f"**{med(times.prism) / fastest:.2f}×** |")
    parts = ", ".join(f"{key} {1000 * med(t[key] for t in times.timings):.1f}" for key in
                      ("queue_s", "prefill_s", "decode_s", "expert_wait_s", "local_experts_s", "total_s"))
    print(f"\nthe gating's timings, ms p50: {parts}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "models" / "demo"))
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
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
