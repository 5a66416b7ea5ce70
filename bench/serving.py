"""Serving benchmark: Prism over NATS (hub + one leaf, gating and one expert host as separate processes).

Prints decode tokens/s and request latency p50/p99 at 1, 4 and 16 concurrent requests, and the latency
added per MoE layer by going through NATS (every expert on the node's own host) against the same model
run in one process, both measured in this run.

    .venv/bin/python bench/serving.py [--model DIR] [--max-tokens 32] [--requests 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared import subjects  # noqa: E402
from shared.model.checkpoint import load_config  # noqa: E402
from shared.model.config import list_moe_layers  # noqa: E402
from shared.nats_server import LeafRemote, NatsServer, ServerConfig, free_port  # noqa: E402


def default_model(workdir: Path) -> Path:
    demo = ROOT / "models" / "demo"
    if (demo / "config.json").exists():
        return demo
    from tests.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(
        "mixtral", workdir / "mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=4
    )


async def start_service(module: str, env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=out
        )


async def wait_until_serving(nc: nats.NATS, node: str) -> None:
    async with asyncio.timeout(60):
        while True:
            try:
                await nc.request(
                    subjects.infer(node), json.dumps({"input_ids": [1], "max_tokens": 1}).encode(), timeout=5
                )
                return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.2)


async def one_request(nc: nats.NATS, node: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"input_ids": prompt, "max_tokens": max_tokens}
    msg = await nc.request(subjects.infer(node), json.dumps(body).encode(), timeout=120)
    return json.loads(msg.data)


async def load_level(nc: nats.NATS, node: str, concurrency: int, rounds: int, max_tokens: int) -> dict[str, float]:
    latencies, tokens = [], 0
    started = time.perf_counter()
    for r in range(rounds):
        prompts = [[(7 * i + 3 * r + j) % 200 + 3 for j in range(16)] for i in range(concurrency)]
        replies = await asyncio.gather(*(one_request(nc, node, p, max_tokens) for p in prompts))
        for reply in replies:
            latencies.append(reply["timings"]["total_s"])
            tokens += reply["usage"]["completion_tokens"]
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "tok_s": tokens / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def in_process_decode_ms(model_dir: Path, max_tokens: int) -> float:
    """Per-token decode time at batch 1 with every expert in this process."""
    from shared.model.generate import generate
    from shared.model.model import MoEModel
    from shared.model.moe import LocalExperts
    from shared.model.sampling import SamplingParams

    model, experts = MoEModel.from_checkpoint(model_dir), LocalExperts.from_checkpoint(model_dir)
    prompt = [[5 + j for j in range(16)]]
    times = []
    with torch.inference_mode():
        for n in (1, max_tokens):  # the difference removes the prefill
            started = time.perf_counter()
            for _ in range(3):
                generate(model, experts, prompt, n, SamplingParams(), eos_token_id=[])
            times.append((time.perf_counter() - started) / 3)
    return 1000 * (times[1] - times[0]) / (max_tokens - 1)


async def prism_decode_ms(nc: nats.NATS, node: str, max_tokens: int) -> float:
    """Per-token decode time at batch 1 through Prism, from the server-side timings."""
    per_token = []
    for r in range(5):
        reply = await one_request(nc, node, [5 + j + r for j in range(16)], max_tokens)
        per_token.append(reply["timings"]["decode_s"] / (reply["usage"]["completion_tokens"] - 1))
    return 1000 * statistics.median(per_token)


async def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="prism-bench-"))
    model = Path(args.model) if args.model else default_model(work)
    config = load_config(model)
    moe_layers = len(list_moe_layers(config))
    hub_cfg = ServerConfig(name="hub", port=free_port(), leaf_port=free_port(), max_payload=8 << 20)
    async with NatsServer(hub_cfg, work) as hub:
        leaf_cfg = ServerConfig(
            name="leaf", port=free_port(), leaf_remotes=(LeafRemote(f"nats://127.0.0.1:{hub.cfg.leaf_port}"),)
        )
        async with NatsServer(leaf_cfg, work) as leaf:
            url = leaf.cfg.client_url()
            procs = [
                await start_service(
                    "services.expert_host",
                    {
                        "PRISM_HOST_NATS_URL": url,
                        "PRISM_HOST_MODEL": str(model),
                        "PRISM_HOST_NODE": "n0",
                        "PRISM_HOST_HOST": "h0",
                    },
                    work / "host.log",
                ),
                await start_service(
                    "services.gating",
                    {"PRISM_GATING_NATS_URL": url, "PRISM_GATING_MODEL": str(model), "PRISM_GATING_NODE": "n0"},
                    work / "gating.log",
                ),
                # the same node's traffic, one message per expert instead of one per host: the alternative
                await start_service(
                    "services.gating",
                    {
                        "PRISM_GATING_NATS_URL": url,
                        "PRISM_GATING_MODEL": str(model),
                        "PRISM_GATING_NODE": "n0-per-expert",
                        "PRISM_GATING_HOST_BATCHING": "false",
                    },
                    work / "gating-per-expert.log",
                ),
            ]
            nc = await nats.connect(url)
            try:
                await wait_until_serving(nc, "n0")
                await wait_until_serving(nc, "n0-per-expert")
                local_ms = in_process_decode_ms(model, args.max_tokens)
                remote_ms = await prism_decode_ms(nc, "n0", args.max_tokens)
                rounds = {c: max(1, args.requests // c) for c in (1, 4, 16)}
                levels = {c: await load_level(nc, "n0", c, n, args.max_tokens) for c, n in rounds.items()}
                per_expert = {
                    c: await load_level(nc, "n0-per-expert", c, n, args.max_tokens) for c, n in rounds.items()
                }
            finally:
                await nc.close()
                for p in procs:
                    p.terminate()
                    await p.wait()
    report(model, config, moe_layers, args, local_ms, remote_ms, levels)
    print("\n| concurrent | one message per expert: tok/s | one per host: tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    for c in levels:
        ratio = levels[c]["tok_s"] / per_expert[c]["tok_s"]
        print(f"| {c} | {per_expert[c]['tok_s']:.1f} | {levels[c]['tok_s']:.1f} | {ratio:.2f}× |")


def report(model, config, moe_layers, args, local_ms, remote_ms, levels) -> None:  # noqa: PLR0917
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU, fp32"
    print(f"# Prism serving benchmark — {machine}")
    print(
        f"model {model.name}: hidden {config.hidden_size}, {config.num_layers} layers ({moe_layers} MoE), "
        f"{config.num_experts} experts top-{config.top_k}; prompt 16 tokens, {args.max_tokens} generated; "
        "hub + 1 leaf, gating and one expert host as processes on loopback\n"
    )
    print("| concurrent | decode tok/s | latency p50 ms | latency p99 ms | tok/s vs 1 |")
    print("|---:|---:|---:|---:|---:|")
    base = levels[1]["tok_s"]
    for c, r in levels.items():
        print(f"| {c} | {r['tok_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['tok_s'] / base:.2f}× |")
    added = (remote_ms - local_ms) / moe_layers
    print("\n| batch-1 decode | ms/token |")
    print("|---|---:|")
    print(f"| in-process (all experts local) | {local_ms:.2f} |")
    print(f"| Prism over NATS (experts on the node's host) | {remote_ms:.2f} |")
    print(f"| added per MoE layer | {added:.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir (default: models/demo, else a generated Mixtral-shaped one)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    asyncio.run(run(parser.parse_args()))
