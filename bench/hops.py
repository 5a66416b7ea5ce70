"""What a route's hop costs: the real stack on loopback (no link delay), batch 1.

Two `prism up` stacks side by side, requests interleaved: three nodes whose routes are the pipeline split
(`--policy route`: node0 runs layers 0-1, node1 2-3, node2 4-5, each holding those layers' experts, so a
decode step of node0's requests makes three one-way hops: 0 → 1 → 2 → 0), and one node holding every
expert (no hop). The difference in ms per token over three is the cost of one hop beside its transport;
a bare chain of the same shape (three leaves, two relay processes that pass a 2 kB message on with the
caller's reply subject) gives the transport alone.

    .venv/bin/python bench/hops.py [--requests 30] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.nats_server import LeafRemote, NatsServer, ServerConfig, free_port  # noqa: E402

RELAY = """
import asyncio, sys, nats
async def main(url, me, nxt):
    nc = await nats.connect(url)
    async def cb(msg):
        if nxt == "reply":
            await nc.publish(msg.reply, msg.data)
        else:
            await nc.publish(f"seg.{nxt}", msg.data, reply=msg.reply)
    await nc.subscribe(f"seg.{me}", cb=cb)
    await asyncio.Event().wait()
import uvloop; uvloop.run(main(*sys.argv[1:]))
"""


def prism_up(model: Path, port: int, run_dir: Path, *flags: str) -> subprocess.Popen[str]:
    argv = [str(ROOT / "prism"), "up", *flags, "--model", str(model), "--run-dir", str(run_dir), "--port", str(port),
            "--mqtt-port", "0", "--monitor-port", "0", "--api-port", "0"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if "prism is up" in line:
            return process
    raise SystemExit(f"prism up {' '.join(flags)} did not start; logs in {run_dir}")


async def decode_ms(url: str, requests: int, max_tokens: int) -> list[float]:
    """ms per decode token of each request to node0 (the gating's own timings), after 5 warm-ups."""
    nc = await nats.connect(url)
    out = []
    try:
        for i in range(requests + 5):
            body = json.dumps({"input_ids": [5, 6, 7, 8], "max_tokens": max_tokens}).encode()
            timings = json.loads((await nc.request("prism.v1.infer.node0", body, timeout=60)).data)["timings"]
            if i >= 5:
                out.append(1000 * timings["decode_s"] / (max_tokens - 1))
    finally:
        await nc.close()
    return out


async def bare_chain_ms(work: Path, samples: int = 300) -> float:
    """Median ms of a → b → c → a through three leaves of one hub, b and c relay processes."""
    hub_cfg = ServerConfig(name="hub", port=free_port(), leaf_port=free_port())
    async with NatsServer(hub_cfg, work) as hub:
        remote = (LeafRemote(f"nats://127.0.0.1:{hub.cfg.leaf_port}"),)
        leaves = {}
        for n in "abc":
            leaves[n] = NatsServer(ServerConfig(name=f"leaf-{n}", port=free_port(), leaf_remotes=remote), work)
            await leaves[n].start()
        relays = [await asyncio.create_subprocess_exec(sys.executable, "-c", RELAY, leaves[n].cfg.client_url(), n, nxt)
                  for n, nxt in (("b", "c"), ("c", "reply"))]
        nc = await nats.connect(leaves["a"].cfg.client_url())
        try:
            times = []
            for i in range(samples + 50):
                started = time.perf_counter()
                try:
                    await nc.request("seg.b", b"x" * 2000, timeout=5)
                except nats.errors.NoRespondersError:  # the relays' interest is still crossing the leaves
                    await asyncio.sleep(0.1)
                    continue
                if i >= 50:
                    times.append(1000 * (time.perf_counter() - started))
                await asyncio.sleep(0.002)  # spaced like decode steps
            return statistics.median(times)
        finally:
            await nc.close()
            for relay in relays:
                relay.terminate()
                await relay.wait()
            for leaf in leaves.values():
                await leaf.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    from shared.model.checkpoint import load_config
    from tests.checkpoints import make_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="prism-hops-"))
    model = make_tiny_checkpoint("mixtral", work / "mixtral-6", seed=5, num_hidden_layers=6)
    memory_mb = 18 * load_config(model).expert_nbytes("float32") / 2**20  # two layers' 16 experts and a little
    ports = {"routed": free_port(), "single": free_port()}
    routed = prism_up(model, ports["routed"], work / "routed", "--nodes", "3", "--hosts-per-node", "1",
                      "--memory-mb", f"{memory_mb:.4f}", "--policy", "route", "--plan-interval", "3600")
    single = prism_up(model, ports["single"], work / "single", "--nodes", "1", "--hosts-per-node", "1")
    urls = {name: f"nats://127.0.0.1:{port}" for name, port in ports.items()}
    try:
        per = {name: [] for name in urls}
        for _ in range(2):  # interleaved halves
            for name, url in urls.items():
                per[name] += asyncio.run(decode_ms(url, args.requests // 2, args.max_tokens))
    finally:
        for process in (routed, single):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    bare = asyncio.run(bare_chain_ms(work))
    route_ms, home_ms = (statistics.median(per[n]) for n in ("routed", "single"))
    print(f"# Route hops — {platform.machine()}, {os.cpu_count()} cores, CPU, fp32; Mixtral tiny, 6 layers × 8 "
          f"experts top-2; batch 1, {args.max_tokens} tokens, {args.requests} requests per stack, interleaved\n")
    print("| path | ms per token p50 | per one-way hop, ms |")
    print("|---|---:|---:|")
    print(f"| one node, every expert embedded | {home_ms:.2f} | — |")
    print(f"| three nodes, pipeline route (3 hops per step) | {route_ms:.2f} | {(route_ms - home_ms) / 3:.3f} |")
    print(f"| bare NATS chain a → b → c → a (2 kB, relay processes) | {bare:.2f} | {bare / 3:.3f} |")


if __name__ == "__main__":
    main()
