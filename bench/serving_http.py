"""The HTTP path of bench/serving.py: the same streaming requests through the OpenAI-compatible API
(`services/api`, its own process) and straight over NATS to the same gating, taking turns block by block
(a block = `concurrent` streams started together), in one run.

Per path: time to first token (request sent → first token's text at the client; p50 and p99 over every
stream) and decode throughput (generated tokens of a block / the block's wall time; median over blocks).
The clients run in the benchmark's process: nats-py decodes JSON chunks; for HTTP, httpx parses SSE, and
a raw client (`RawSse`: HTTP/1.1 over asyncio streams, one kept-alive connection per concurrent stream)
does the same with a few lines of code, so that the client library's own cost (httpx spends about a
millisecond of CPU per request; 16 requests at once spread their start by tens of ms) shows apart from
the API's.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

import httpx
import nats

from shared import subjects


async def nats_stream(nc: nats.NATS, node: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """(time to first token s, tokens) of one streaming request on `prism.v1.infer.<node>`."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    started = time.perf_counter()
    first = 0.0
    body = {"input_ids": prompt, "max_tokens": max_tokens, "stream": True}
    await nc.publish(subjects.infer(node), json.dumps(body).encode(), reply=inbox)
    try:
        while True:
            data = json.loads((await sub.next_msg(timeout=120)).data)
            if data.get("done"):
                if "error" in data:
                    raise RuntimeError(data["error"])
                return first, int(data["usage"]["completion_tokens"])
            first = first or time.perf_counter() - started
    finally:
        await sub.unsubscribe()


async def http_stream(http: httpx.AsyncClient, node: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """The same request through the API: POST /v1/completions with stream and usage, SSE parsed here."""
    body = {"model": http.headers["x-model"], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, tokens = 0.0, 0
    async with http.stream("POST", "/v1/completions", json=body, headers={"X-Prism-Node": node}) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event: dict[str, Any] = json.loads(line[6:])
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
            elif event["choices"] and event["choices"][0]["text"]:
                first = first or time.perf_counter() - started
    return first, tokens


class RawSse:
    """One kept-alive HTTP/1.1 connection to the API: POST a streaming completion, read its SSE events
    (chunked transfer encoding, as uvicorn sends a streaming response)."""

    def __init__(self, host: str, port: int, model: str) -> None:
        self.host, self.port, self.model = host, port, model
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def stream(self, node: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        body = json.dumps({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"X-Prism-Node: {node}\r\nContent-Length: {len(body)}\r\n\r\n")
        started = time.perf_counter()
        writer.write(head.encode() + body)
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"API answered {status!r}")
        while await reader.readline() not in (b"\r\n", b""):  # headers
            pass
        first, tokens, pending = 0.0, 0, b""
        while size := int((await reader.readline()).strip(), 16):  # chunks until the last, empty one
            pending += (await reader.readexactly(size + 2))[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    continue
                parsed = json.loads(data)
                if parsed.get("usage"):
                    tokens = int(parsed["usage"]["completion_tokens"])
                elif parsed["choices"] and parsed["choices"][0]["text"]:
                    first = first or time.perf_counter() - started
        await reader.readline()  # the empty chunk's CRLF
        return first, tokens

    async def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


async def http_vs_nats(nc: nats.NATS, api_url: str, model: str, node: str, *, blocks: int, concurrent: int,
                       max_tokens: int) -> dict[str, dict[str, float]]:
    """Per path ("nats", "http", "raw"): ttft_p50_ms, ttft_p99_ms, tok_s (median over its blocks)."""
    paths = ("nats", "http", "raw")
    raw: dict[str, dict[str, list[float]]] = {p: {"ttft": [], "tok_s": []} for p in paths}
    limits = httpx.Limits(max_connections=concurrent, max_keepalive_connections=concurrent)
    address = httpx.URL(api_url)
    lanes = [RawSse(address.host, address.port or 80, model) for _ in range(concurrent)]
    async with httpx.AsyncClient(base_url=api_url, timeout=120, limits=limits, headers={"x-model": model}) as http:
        for block in range(blocks):
            prompts = [[(7 * i + 5 * block + j) % 200 + 3 for j in range(16)] for i in range(concurrent)]
            for path in paths[block % 3:] + paths[: block % 3]:  # each path first in turn
                started = time.perf_counter()
                if path == "nats":
                    runs = [nats_stream(nc, node, p, max_tokens) for p in prompts]
                elif path == "http":
                    runs = [http_stream(http, node, p, max_tokens) for p in prompts]
                else:
                    runs = [lane.stream(node, p, max_tokens) for lane, p in zip(lanes, prompts, strict=True)]
                results = await asyncio.gather(*runs)
                wall = time.perf_counter() - started
                raw[path]["ttft"] += [ttft for ttft, _ in results]
                raw[path]["tok_s"].append(sum(tokens for _, tokens in results) / wall)
    for lane in lanes:
        await lane.close()
    out = {}
    for path, cell in raw.items():
        ttft = sorted(cell["ttft"])
        out[path] = {"ttft_p50_ms": 1000 * statistics.median(ttft),
                     "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
                     "tok_s": statistics.median(cell["tok_s"])}
    return out


async def wait_for_api(api_url: str, timeout_s: float = 60) -> None:
    async with httpx.AsyncClient(base_url=api_url) as http, asyncio.timeout(timeout_s):
        while True:
            try:
                if (await http.get("/v1/models")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)


def print_table(results: dict[str, dict[str, float]], *, blocks: int, concurrent: int, max_tokens: int) -> None:
    nats_r = results["nats"]
    print(f"\nHTTP API vs NATS, same gating (every expert embedded), {concurrent} concurrent streams, prompt 16 "
          f"tokens, {max_tokens} generated, greedy; {blocks} blocks per path, taking turns")
    print("| path | TTFT p50 ms | TTFT p99 ms | decode tok/s | time vs NATS |")
    print("|---|---:|---:|---:|---:|")
    names = {"nats": "NATS (`prism.v1.infer`, streaming)", "http": "HTTP (`/v1/completions`, SSE), httpx client",
             "raw": "HTTP (`/v1/completions`, SSE), raw client"}
    for path, name in names.items():
        r = results[path]
        print(f"| {name} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['tok_s']:.1f} | "
              f"{nats_r['tok_s'] / r['tok_s']:.2f}× |")
