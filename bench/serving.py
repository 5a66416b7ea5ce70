"""Serving benchmark: Prism over NATS (a hub, a leaf per node, gatings and expert hosts as processes).

Prints decode tokens/s and request latency p50/p99 at 1, 4 and 16 concurrent requests, and the latency
added per MoE layer by going through NATS (every expert on the node's own host) against the same engine
with its experts in this process. The latency runs interleave the alternatives request by request (the
machines here are shared and noisy): in-process, node n0 (its host busy-polls 2 ms after a batch, the
service default) and node n1 (an identical node whose host sleeps between batches, `busy_poll_s=0`),
then a bare round trip of the same size to an echo process, spaced like the layers of a decode step.
A second table splits each node's wait on experts (routing to combining, from the replies' timings) into
its host's answering time (host status `busy_s`) and the rest (the gating's dispatch code and the
transport), next to the bare round trip. The last table is the HTTP path (bench/serving_http.py): the
same streaming requests through the OpenAI-compatible API and over NATS to node n2, 16 concurrent streams;
`--http-only` runs just that (a hub, node n2's leaf and gating, the API).

    .venv/bin/python bench/serving.py [--model DIR] [--max-tokens 32] [--requests 16] [--http-only] [--http-blocks 6]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving_http import http_vs_nats, print_table, wait_for_api  # noqa: E402
from shared import subjects  # noqa: E402
from shared.codec import encode_tensor  # noqa: E402
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


async def start_process(argv: list[str], log: Path, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            *argv, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=out
        )


async def start_service(module: str, env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    return await start_process([sys.executable, "-m", module], log, env)


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


LEVELS = (1, 4, 16)
EMBEDDED_ALL = json.dumps([{"host": "n2-host", "experts": "*:*"}])


async def load_levels(nc: nats.NATS, nodes: list[str], requests: int, max_tokens: int) -> dict[str, dict[int, dict]]:
    """tok/s and latency per node and concurrency. The levels and nodes take turns in blocks of 16
    requests (16 one after another, 4 rounds of 4, one of 16), so a slow minute hits every one alike."""
    raw = {node: {c: {"latencies": [], "tokens": 0, "wall": 0.0} for c in LEVELS} for node in nodes}
    for block in range(max(1, requests // 16)):
        for c in LEVELS:
            for node in nodes:
                cell = raw[node][c]
                started = time.perf_counter()
                for r in range(16 // c):
                    prompts = [[(7 * i + 3 * r + 5 * block + j) % 200 + 3 for j in range(16)] for i in range(c)]
                    for reply in await asyncio.gather(*(one_request(nc, node, p, max_tokens) for p in prompts)):
                        cell["latencies"].append(reply["timings"]["total_s"])
                        cell["tokens"] += reply["usage"]["completion_tokens"]
                cell["wall"] += time.perf_counter() - started
    return {node: {c: _level_stats(cell) for c, cell in cells.items()} for node, cells in raw.items()}


def _level_stats(cell: dict) -> dict[str, float]:
    latencies = sorted(cell["latencies"])
    return {
        "tok_s": cell["tokens"] / cell["wall"],
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


class InProcess:
    """The baseline: the gating's own engine, its experts in this process (no NATS)."""

    def __init__(self, model_dir: Path) -> None:
        from services.gating.engine import Engine
        from shared.model.model import MoEModel
        from shared.model.moe import LocalExperts

        model = MoEModel.from_checkpoint(model_dir)
        self.experts = LocalExperts.from_checkpoint(model_dir)
        stop = frozenset(model.config.eos_token_ids)  # as the gating stops
        self.engine = Engine(model, self._experts, max_slots=max(LEVELS), max_len=256, max_queue=max(LEVELS),
                             inline_max_tokens=64, stop_ids=stop)

    async def _experts(self, call, live):  # the engine's ExpertsFn
        from services.gating.engine import ExpertsResult

        return ExpertsResult(self.experts(call), None)

    async def decode_ms(self, prompt: list[int], max_tokens: int) -> float:
        from services.gating.engine import DoneEvent, ErrorEvent, Sequence
        from shared.model.sampling import SamplingParams

        seq = Sequence(prompt, max_tokens, SamplingParams(), stream=False)
        self.engine.submit(seq)
        while not isinstance(await seq.events.get(), DoneEvent | ErrorEvent):
            pass
        return 1000 * (seq.finished - seq.first_token) / max(1, len(seq.generated) - 1)


    async def total_s(self, prompt: list[int], max_tokens: int) -> tuple[float, int]:
        """(seconds from submit to the last token, tokens generated) of one request."""
        from services.gating.engine import DoneEvent, ErrorEvent, Sequence
        from shared.model.sampling import SamplingParams

        seq = Sequence(prompt, max_tokens, SamplingParams(), stream=False)
        self.engine.submit(seq)
        while not isinstance(await seq.events.get(), DoneEvent | ErrorEvent):
            pass
        return seq.finished - seq.arrived, len(seq.generated)


async def inprocess_levels(baseline: InProcess, requests: int, max_tokens: int) -> dict[int, dict]:
    """The in-process engine at the same levels and prompts as `load_levels` (continuous batching too)."""
    runner = asyncio.create_task(baseline.engine.run())
    raw = {c: {"latencies": [], "tokens": 0, "wall": 0.0} for c in LEVELS}
    try:
        for block in range(max(1, requests // 16)):
            for c in LEVELS:
                cell = raw[c]
                started = time.perf_counter()
                for r in range(16 // c):
                    prompts = [[(7 * i + 3 * r + 5 * block + j) % 200 + 3 for j in range(16)] for i in range(c)]
                    for total, tokens in await asyncio.gather(*(baseline.total_s(p, max_tokens) for p in prompts)):
                        cell["latencies"].append(total)
                        cell["tokens"] += tokens
                cell["wall"] += time.perf_counter() - started
    finally:
        runner.cancel()
    return {c: _level_stats(cell) for c, cell in raw.items()}


async def prism_decode_ms(nc: nats.NATS, node: str, prompt: list[int], max_tokens: int, moe_layers: int):
    """(ms per decode token, ms waiting on experts per MoE layer and step) of one request through Prism,
    from the server-side timings."""
    reply = await one_request(nc, node, prompt, max_tokens)
    tokens = reply["usage"]["completion_tokens"]  # one forward step each (the first is the prefill)
    wait_ms = 1000 * reply["timings"]["expert_wait_s"] / (tokens * moe_layers)
    return 1000 * reply["timings"]["decode_s"] / max(1, tokens - 1), wait_ms


async def host_busy(nc: nats.NATS, host: str) -> tuple[int, float]:
    """(data messages answered, seconds spent answering them) so far, from the host's status."""
    msg = await nc.request(subjects.host_cmd(host), b'{"kind": "status"}', timeout=5)
    status = json.loads(msg.data)
    return status["messages_served"], status["busy_s"]


ECHO_SUBJECT = "bench.echo"


async def echo(url: str) -> None:
    """The bare transport: a process that answers every request with its payload."""
    nc = await nats.connect(url)

    async def answer(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(ECHO_SUBJECT, cb=answer)
    await asyncio.Event().wait()


async def bare_round_trip_ms(nc: nats.NATS, payload: bytes, layers: int, gap_s: float) -> tuple[float, float]:
    """One decode step's worth of bare round trips: `layers` requests, `gap_s` of busy CPU between them
    (the dense compute of a layer); (median, mean) in ms."""
    times = []
    for _ in range(layers):
        until = time.perf_counter() + gap_s
        while time.perf_counter() < until:
            pass
        started = time.perf_counter()
        await nc.request(ECHO_SUBJECT, payload, timeout=5)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times), 1000 * statistics.mean(times)


async def batch1_latency(
    nc: nats.NATS, baseline: InProcess, args: argparse.Namespace, config, moe_layers: int
) -> dict[str, list[float]]:
    """ms/token at batch 1 (and a bare round trip), the alternatives interleaved request by request;
    for each node also where its added time goes: waiting on experts, and its host answering."""
    runner = asyncio.create_task(baseline.engine.run())
    nodes = ("n0", "n1", "n2")
    out: dict[str, list[float]] = {"in-process": [], "bare": [], "bare-mean": []}
    for node in nodes:
        out[node], out[f"wait:{node}"], out[f"host:{node}"] = [], [], []
    # a batch-1 host batch: top_k rows, one per chosen expert
    experts = list(range(config.top_k))
    batch = encode_tensor(
        torch.zeros(config.top_k, config.hidden_size), {"layer": 0, "experts": experts, "counts": [1] * config.top_k}
    )
    warm_up = [5 + j for j in range(16)]  # a first request touches cold code paths on every side
    await baseline.decode_ms(warm_up, args.max_tokens)
    for node in nodes:
        await prism_decode_ms(nc, node, warm_up, args.max_tokens, moe_layers)
    try:
        for r in range(args.latency_rounds):
            prompt = [5 + (j * 7 + r) % 200 for j in range(16)]
            out["in-process"].append(await baseline.decode_ms(prompt, args.max_tokens))
            for node in nodes:
                before = await host_busy(nc, f"{node}-host")
                ms, wait_ms = await prism_decode_ms(nc, node, prompt, args.max_tokens, moe_layers)
                after = await host_busy(nc, f"{node}-host")
                out[node].append(ms)
                out[f"wait:{node}"].append(wait_ms)
                out[f"host:{node}"].append(1000 * (after[1] - before[1]) / max(1, after[0] - before[0]))
            gap_s = out["in-process"][-1] / 1000 / moe_layers
            median, mean = await bare_round_trip_ms(nc, batch, 2 * moe_layers, gap_s)
            out["bare"].append(median)
            out["bare-mean"].append(mean)
    finally:
        runner.cancel()
    return out


def host_env(url: str, model: Path, node: str, **extra: str) -> dict[str, str]:
    env = {"PRISM_HOST_NATS_URL": url, "PRISM_HOST_MODEL": str(model), "PRISM_HOST_NODE": node}
    return {**env, "PRISM_HOST_HOST": f"{node}-host", **extra}


def gating_env(url: str, model: Path, node: str, **extra: str) -> dict[str, str]:
    return {"PRISM_GATING_NATS_URL": url, "PRISM_GATING_MODEL": str(model), "PRISM_GATING_NODE": node, **extra}


def api_env(hub_url: str, model: Path, port: int) -> dict[str, str]:
    """The HTTP API on the hub, as `prism up` starts it."""
    return {"PRISM_API_NATS_URL": hub_url, "PRISM_API_MODEL": str(model), "PRISM_API_PORT": str(port)}


async def http_path(nc: nats.NATS, api_url: str, model: Path, args: argparse.Namespace) -> None:
    """The HTTP table: node n2 through the API and over NATS, taking turns."""
    await wait_for_api(api_url)
    results = await http_vs_nats(nc, api_url, model.name, "n2", blocks=args.http_blocks, concurrent=16,
                                 max_tokens=args.max_tokens)
    print_table(results, blocks=args.http_blocks, concurrent=16, max_tokens=args.max_tokens)


async def run_http_only(args: argparse.Namespace) -> None:
    """Only the HTTP path: a hub, node n2's leaf and gating (every expert embedded), the API."""
    work = Path(tempfile.mkdtemp(prefix="prism-bench-"))
    model = (Path(args.model) if args.model else default_model(work)).absolute()
    hub_cfg = ServerConfig(name="hub", port=free_port(), leaf_port=free_port(), max_payload=8 << 20)
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(NatsServer(hub_cfg, work))
        remote = (LeafRemote(f"nats://127.0.0.1:{hub.cfg.leaf_port}"),)
        leaf = await stack.enter_async_context(
            NatsServer(ServerConfig(name="leaf-n2", port=free_port(), leaf_remotes=remote), work))
        port = free_port()
        procs = [
            await start_service("services.gating", gating_env(leaf.cfg.client_url(), model, "n2",
                                PRISM_GATING_EMBEDDED_HOSTS=EMBEDDED_ALL), work / "gating-n2.log"),
            await start_service("services.api", api_env(hub.cfg.client_url(), model, port), work / "api.log"),
        ]
        nc = await nats.connect(hub.cfg.client_url())  # where the API connects too
        try:
            await wait_until_serving(nc, "n2")
            machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU, fp32"
            print(f"# Prism HTTP path — {machine}, model {model.name}, 1 torch thread per process")
            await http_path(nc, f"http://127.0.0.1:{port}", model, args)
        finally:
            await nc.close()
            for p in procs:
                if p.returncode is None:
                    p.terminate()
                await p.wait()


async def run(args: argparse.Namespace) -> None:
    from shared.model.inference import inference_only

    torch.set_num_threads(1)
    inference_only()  # the in-process baseline computes as a gating does
    work = Path(tempfile.mkdtemp(prefix="prism-bench-"))
    model = Path(args.model) if args.model else default_model(work)
    config = load_config(model)
    moe_layers = len(list_moe_layers(config))
    hub_cfg = ServerConfig(name="hub", port=free_port(), leaf_port=free_port(), max_payload=8 << 20)
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(NatsServer(hub_cfg, work))
        remote = (LeafRemote(f"nats://127.0.0.1:{hub.cfg.leaf_port}"),)
        urls = {}
        for node in ("n0", "n1", "n2"):  # one leaf per node: queue groups answer from the node's own host
            leaf = await stack.enter_async_context(
                NatsServer(ServerConfig(name=f"leaf-{node}", port=free_port(), leaf_remotes=remote), work)
            )
            urls[node] = leaf.cfg.client_url()
        services = {
            "host-n0": ("services.expert_host", host_env(urls["n0"], model, "n0")),
            "host-n1": ("services.expert_host", host_env(urls["n1"], model, "n1", PRISM_HOST_BUSY_POLL_S="0")),
            "gating-n0": ("services.gating", gating_env(urls["n0"], model, "n0")),
            "gating-n1": ("services.gating", gating_env(urls["n1"], model, "n1")),
            # node n2: every expert embedded in its gating's process (no host process, no broker)
            "gating-n2": (
                "services.gating",
                gating_env(urls["n2"], model, "n2", PRISM_GATING_EMBEDDED_HOSTS=EMBEDDED_ALL),
            ),
            # node n0's traffic, one message per expert instead of one per host: the alternative
            "gating-n0-per-expert": (
                "services.gating",
                gating_env(urls["n0"], model, "n0-per-expert", PRISM_GATING_HOST_MESSAGES="false"),
            ),
        }
        api_port = free_port()
        services["api"] = ("services.api", api_env(hub.cfg.client_url(), model, api_port))
        procs = [await start_service(module, env, work / f"{name}.log") for name, (module, env) in services.items()]
        procs.append(await start_process([sys.executable, __file__, "--echo", urls["n0"]], work / "echo.log"))
        hub_nc = await nats.connect(hub.cfg.client_url())  # the API's server: both paths start there
        nc = await nats.connect(urls["n0"])
        try:
            for node in ("n0", "n1", "n2", "n0-per-expert"):
                await wait_until_serving(nc, node)
            await nc.request(ECHO_SUBJECT, b"ready?", timeout=10)
            baseline = InProcess(model)
            latency = await batch1_latency(nc, baseline, args, config, moe_layers)
            inproc = await inprocess_levels(baseline, args.requests, args.max_tokens)
            both = await load_levels(nc, ["n0", "n0-per-expert", "n2"], args.requests, args.max_tokens)
            levels, per_expert, embedded = both["n0"], both["n0-per-expert"], both["n2"]
            await http_path(hub_nc, f"http://127.0.0.1:{api_port}", model, args)  # printed before the rest
        finally:
            await nc.close()
            await hub_nc.close()
            for p in procs:
                if p.returncode is None:
                    p.terminate()
                await p.wait()
    report(model, config, moe_layers, args, latency, levels)
    print("\n| concurrent | one message per expert: tok/s | one per host: tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    for c in levels:
        ratio = levels[c]["tok_s"] / per_expert[c]["tok_s"]
        print(f"| {c} | {per_expert[c]['tok_s']:.1f} | {levels[c]['tok_s']:.1f} | {ratio:.2f}× |")
    print("\n| concurrent | in-process: tok/s | host process: tok/s | embedded: tok/s | embedded vs in-process "
          "| embedded vs host process | embedded p50 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        emb = embedded[c]
        print(f"| {c} | {inproc[c]['tok_s']:.1f} | {levels[c]['tok_s']:.1f} | {emb['tok_s']:.1f} | "
              f"{emb['tok_s'] / inproc[c]['tok_s']:.2f}× | {emb['tok_s'] / levels[c]['tok_s']:.2f}× | "
              f"{emb['p50_ms']:.0f} |")


def report(model, config, moe_layers, args, latency, levels) -> None:  # noqa: PLR0917
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU, fp32"
    print(f"# Prism serving benchmark — {machine}")
    print(
        f"model {model.name}: hidden {config.hidden_size}, {config.num_layers} layers ({moe_layers} MoE), "
        f"{config.num_experts} experts top-{config.top_k}; prompt 16 tokens, {args.max_tokens} generated; "
        "hub + a leaf per node, gatings and expert hosts as processes on loopback\n"
    )
    print("| concurrent | decode tok/s | latency p50 ms | latency p99 ms | tok/s vs 1 |")
    print("|---:|---:|---:|---:|---:|")
    base = levels[1]["tok_s"]
    for c, r in levels.items():
        print(f"| {c} | {r['tok_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['tok_s'] / base:.2f}× |")
    local = latency["in-process"]
    print(f"\nbatch-1 decode, {len(local)} requests of each, interleaved; added = median over requests of "
          "(Prism − in-process) / MoE layers")
    print("| path | ms/token p50 | added per MoE layer, ms p50 | vs in-process |")
    print("|---|---:|---:|---:|")
    print(f"| in-process engine (all experts local) | {statistics.median(local):.2f} | — | 1.00× |")
    names = {
        "n0": "Prism, host busy-polls 2 ms after a batch (host process)",
        "n1": "Prism, host sleeps between batches (host process)",
        "n2": "Prism, every expert embedded in the gating",
    }
    for node, name in names.items():
        added = [(r - x) / moe_layers for r, x in zip(latency[node], local, strict=True)]
        ratio = statistics.median(latency[node]) / statistics.median(local)
        print(f"| {name} | {statistics.median(latency[node]):.2f} | {statistics.median(added):.3f} | {ratio:.2f}× |")
    bare = statistics.median(latency["bare"])
    print(f"| bare NATS round trip through the leaf (same payload, echo process) | — | {bare:.3f} | — |")
    print("\nwhere a layer's wait on experts goes: means over each request's layers and steps (prefill included; "
          "the bare round trip's over its requests), ms p50 over requests")
    print("| path | gating waits on experts | its host answering | the rest: gating's dispatch code and transport "
          "| bare round trip |")
    print("|---|---:|---:|---:|---:|")
    bare_mean = statistics.median(latency["bare-mean"])
    for node, name in list(names.items())[:2]:
        wait, host = statistics.median(latency[f"wait:{node}"]), statistics.median(latency[f"host:{node}"])
        print(f"| {name} | {wait:.3f} | {host:.3f} | {wait - host:.3f} | {bare_mean:.3f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint dir (default: models/demo, else a generated Mixtral-shaped one)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (blocks of 16)")
    parser.add_argument("--latency-rounds", type=int, default=15, help="batch-1 requests per path, interleaved")
    parser.add_argument("--http-only", action="store_true", help="only the HTTP API vs NATS table")
    parser.add_argument("--http-blocks", type=int, default=6, help="blocks of 16 streams per path (HTTP table)")
    parser.add_argument("--echo", metavar="URL", help=argparse.SUPPRESS)  # internal: run the echo process
    cli = parser.parse_args()
    asyncio.run(echo(cli.echo) if cli.echo else run_http_only(cli) if cli.http_only else run(cli))
