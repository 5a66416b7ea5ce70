"""How fast a host loads experts from the weights store: one `load` command of N experts over an emulated
link, at several `LOAD_CONCURRENCY` values, taking turns.

A hub with JetStream holds the demo model's experts in its object store; node a's leaf reaches the hub
through the link emulator (`--delay-ms` one way, `--rate-mbit`); an expert host (the service's class, in
this process, on the leaf) gets `load` commands over NATS as the migrator sends them, and after each an
`unload` of the same experts. Each object costs several round trips to the hub besides its bytes (its
info, a consumer, the chunks), which one fetch at a time pays in turn. Then one object of `--big-mb`
(random bytes, a real model's expert: DeepSeek-V2-Lite's are 17 MB in bf16) read through the same link
by nats-py's `ObjectStore.get` and by `WeightsStore.read` (shared/weights.py), taking turns.

    .venv/bin/python bench/migration.py [--experts 64] [--rounds 3] [--concurrency 1,4,8] [--delay-ms 2]
                                        [--rate-mbit 500]
"""

from __future__ import annotations

import argparse
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
import uvloop
from nats.js.api import ObjectMeta, ObjectMetaOptions
from nats.js.object_store import ObjectStore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.expert_host.service import ExpertHost, load_weights, open_store  # noqa: E402
from services.expert_host.settings import ExpertHostSettings  # noqa: E402
from shared import subjects  # noqa: E402
from shared.linkemu import LinkEmulator, LinkShape  # noqa: E402
from shared.logs import configure_logging  # noqa: E402
from shared.model.moe import LocalExperts  # noqa: E402
from shared.nats_server import LeafRemote, NatsServer, ServerConfig, free_port  # noqa: E402
from shared.weights import CHUNK_BYTES, WeightsStore, open_weights_store, upload_expert  # noqa: E402

MODEL = ROOT / "models" / "demo"


async def command(nc: nats.NATS, host: str, kind: str, keys: list[tuple[int, int]]) -> float:
    """Seconds until the host answered `kind` for `keys`."""
    body = json.dumps({"kind": kind, "epoch": 1, "experts": [list(k) for k in keys]}).encode()
    started = time.perf_counter()
    msg = await nc.request(subjects.host_cmd(host), body, timeout=600)
    if msg.headers:
        raise SystemExit(f"{host} refused {kind}: {msg.data.decode()}")
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> None:
    configure_logging("warning")
    work = Path(tempfile.mkdtemp(prefix="prism-migration-"))
    hub_cfg = ServerConfig(name="hub", port=free_port(), leaf_port=free_port(), store_dir=work / "js",
                           domain=subjects.JETSTREAM_DOMAIN)
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(NatsServer(hub_cfg, work))
        link = LinkEmulator("127.0.0.1", hub.cfg.leaf_port, LinkShape.from_ms_mbit(args.delay_ms, args.rate_mbit))
        await link.start()
        stack.push_async_callback(link.stop)
        remote = (LeafRemote(f"nats://127.0.0.1:{link.port}"),)
        leaf = await stack.enter_async_context(NatsServer(ServerConfig(name="a", port=free_port(),
                                                                       leaf_remotes=remote), work))
        upload = await nats.connect(hub.cfg.client_url())
        store = await open_weights_store(upload.jetstream(domain=subjects.JETSTREAM_DOMAIN), "bench-weights")
        experts = LocalExperts.from_checkpoint(MODEL).weights
        keys = sorted(experts)[: args.experts]
        for key in keys:
            await upload_expert(store, "demo", key, experts[key])
        nc = await nats.connect(leaf.cfg.client_url())
        hosts = {}
        for c in args.concurrency:
            settings = ExpertHostSettings(host=f"a-c{c}", node="a", model=MODEL, model_id="demo", experts="",
                                          weights_bucket="bench-weights", load_concurrency=c)
            weights, hidden = load_weights(settings)
            host = ExpertHost(await nats.connect(leaf.cfg.client_url()), settings, weights, hidden,
                              await open_store(nc, "bench-weights"))
            await host.start()
            hosts[c] = host
        await nc.flush()
        seconds: dict[int, list[float]] = {c: [] for c in args.concurrency}
        for r in range(args.rounds):
            order = args.concurrency[r % len(args.concurrency):] + args.concurrency[: r % len(args.concurrency)]
            for c in order:
                seconds[c].append(await command(nc, hosts[c].settings.host, "load", keys))
                await command(nc, hosts[c].settings.host, "unload", keys)
        for host in hosts.values():
            await host.stop()
            await host.nc.close()
        big = await read_big(store, await open_store(nc, "bench-weights"), args)
        await nc.close()
        await upload.close()
    expert_kb = experts[keys[0]].nbytes() / 1024
    print(f"# a host's load of {len(keys)} experts ({expert_kb:.0f} KiB each, the demo model, fp32) over a link of "
          f"{args.delay_ms:g} ms one way, {args.rate_mbit:g} Mbit/s — {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; median of {args.rounds} rounds, the concurrencies taking turns\n")
    print("| LOAD_CONCURRENCY | load s | ms per expert | time vs 1 at once |")
    print("|---:|---:|---:|---:|")
    base = statistics.median(seconds[args.concurrency[0]])
    for c in args.concurrency:
        s = statistics.median(seconds[c])
        print(f"| {c} | {s:.2f} | {1000 * s / len(keys):.1f} | {s / base:.2f}× |")
    print(f"\none object of {args.big_mb:g} MB (128 KiB chunks) read over the same link, median of {args.rounds}")
    print("| reader | ms | vs nats-py's get |\n|---|---:|---:|")
    for name, s in big.items():
        print(f"| {name} | {1000 * s:.0f} | {s / big['ObjectStore.get (nats-py)']:.2f}× |")


async def read_big(store: ObjectStore, reader: WeightsStore | None, args: argparse.Namespace) -> dict[str, float]:
    """Seconds to read one big object each way (median of the rounds, taking turns); both reads compared."""
    data = os.urandom(int(args.big_mb * 2**20))
    await store.put("big", data, meta=ObjectMeta(name="big", options=ObjectMetaOptions(max_chunk_size=CHUNK_BYTES)))
    assert reader is not None
    times: dict[str, list[float]] = {"ObjectStore.get (nats-py)": [], "WeightsStore.read": []}
    for _ in range(args.rounds):
        for name, spent in times.items():
            started = time.perf_counter()
            got = (await store.get("big")).data if name.startswith("ObjectStore") else await reader.read("big")
            spent.append(time.perf_counter() - started)
            if got != data:
                raise SystemExit(f"{name} read other bytes")
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--experts", type=int, default=64, help="experts per load (the demo model has 128)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,8", help="LOAD_CONCURRENCY values, the first is the base")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="one way, node to hub")
    parser.add_argument("--rate-mbit", type=float, default=500.0)
    parser.add_argument("--big-mb", type=float, default=17.0, help="size of the one big object read both ways")
    cli = parser.parse_args()
    cli.concurrency = [int(c) for c in cli.concurrency.split(",")]
    uvloop.run(run(cli))
