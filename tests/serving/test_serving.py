"""Prism over real NATS (hub + one leaf per node): exact answers, locality, bad input, lost experts."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import pytest

from tests.serving.conftest import LocalCluster, ask, reference

pytestmark = pytest.mark.slow


async def spread(cluster: LocalCluster, model: Path) -> None:
    """Node a: hosts a0 (experts 0-3) and a1 (4-7); node b: host b0 (0-3). b needs a1 for experts 4-7."""
    await cluster.add_node("a")
    await cluster.add_node("b")
    await cluster.add_host("a", "a0", model, "*:0-3")
    await cluster.add_host("a", "a1", model, "*:4-7")
    await cluster.add_host("b", "b0", model, "*:0-3")
    await cluster.add_gating("a", model)
    await cluster.add_gating("b", model)
    await cluster.settle()


def prompts(n: int, seed: int, vocab: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(4, 24))] for _ in range(n)]


@pytest.mark.parametrize("family", ["mixtral", "qwen2"])
async def test_greedy_equals_in_process(cluster: LocalCluster, family: str, mixtral_dir: Path, qwen2_dir: Path) -> None:
    model = mixtral_dir if family == "mixtral" else qwen2_dir
    await spread(cluster, model)
    batch = prompts(4, seed=0)
    expected = reference(model, batch, max_tokens=12)
    nc = await cluster.connect("a")
    for i, prompt in enumerate(batch):
        node = cluster.node("a" if i % 2 else "b")
        reply, _ = await ask(nc if i % 2 else await cluster.connect("b"), node, {"input_ids": prompt, "max_tokens": 12})
        assert reply["token_ids"] == expected[i], f"prompt {i} on {node}"
        assert reply["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(expected[i])}


async def test_sixteen_concurrent_requests_batch_and_match(cluster: LocalCluster, mixtral_dir: Path) -> None:
    await spread(cluster, mixtral_dir)
    batch = prompts(16, seed=1)
    expected = reference(mixtral_dir, batch, max_tokens=10)
    nc = await cluster.connect("b")
    gating = cluster.gatings["b"]
    steps_before = gating.engine.steps
    replies = await asyncio.gather(
        *(ask(nc, cluster.node("b"), {"input_ids": p, "max_tokens": 10}) for p in batch)
    )
    assert [r["token_ids"] for r, _ in replies] == expected
    # 16 requests of 10 tokens each in far fewer than 160 steps: they were decoded together
    assert gating.engine.steps - steps_before < 80


async def test_local_holder_serves_its_own_node(cluster: LocalCluster, mixtral_dir: Path) -> None:
    await spread(cluster, mixtral_dir)
    a0, a1, b0 = (cluster.hosts[h] for h in ("a0", "a1", "b0"))
    before = {h: cluster.hosts[h].counters.calls for h in cluster.hosts}
    await ask(await cluster.connect("b"), cluster.node("b"), {"input_ids": prompts(1, 2)[0], "max_tokens": 6})
    assert a0.counters.calls == before["a0"], "experts 0-3 of node b must be served by b's own host"
    assert b0.counters.calls > before["b0"]
    assert a1.counters.calls > before["a1"], "experts 4-7 exist only on node a"
    before = {h: cluster.hosts[h].counters.calls for h in cluster.hosts}
    await ask(await cluster.connect("a"), cluster.node("a"), {"input_ids": prompts(1, 3)[0], "max_tokens": 6})
    assert b0.counters.calls == before["b0"], "node a holds everything it needs"


BAD_REQUESTS = [
    (b"{nope", "invalid_json"),
    (b'{"max_tokens": 3}', "invalid_request"),
    (b'{"prompt": "x", "input_ids": [1]}', "invalid_request"),
    (b'{"input_ids": [1], "max_tokens": 0}', "invalid_request"),
    (b'{"input_ids": [1], "max_tokens": 99999}', "invalid_request"),
    (b'{"input_ids": [1], "temperature": -0.5}', "invalid_request"),
    (b'{"input_ids": [1], "top_p": 2}', "invalid_request"),
    (b'{"input_ids": [1, 100000]}', "token_out_of_range"),
    (b'{"input_ids": [-1]}', "token_out_of_range"),
]


async def test_bad_requests_get_coded_errors_and_node_keeps_serving(cluster: LocalCluster, mixtral_dir: Path) -> None:
    await spread(cluster, mixtral_dir)
    nc = await cluster.connect("a")
    node = cluster.node("a")
    long_prompt = {"input_ids": [5] * 2000, "id": "long"}
    for payload, code in [*BAD_REQUESTS, (long_prompt, "prompt_too_long")]:
        reply, headers = await ask(nc, node, payload)
        assert reply["done"] is True
        assert reply["error"]["code"] == code, reply
        assert headers["Nats-Service-Error-Code"] in {"400", "413"}
    assert reply["id"] == "long"
    good = prompts(1, 4)[0]
    reply, _ = await ask(nc, node, {"input_ids": good, "max_tokens": 5})
    assert reply["token_ids"] == reference(mixtral_dir, [good], 5)[0]


async def test_hostile_traffic_leaves_serving_alone(cluster: LocalCluster, mixtral_dir: Path) -> None:
    """A heartbeat naming a host that cannot exist, a request nobody could read the answer to, JSON
    too deep to decode: none of it disturbs the node."""
    from shared import subjects

    await spread(cluster, mixtral_dir)
    nc = await cluster.connect("a")
    node = cluster.node("a")
    fake = {"host": "a.b", "node": node, "device": "cpu", "memory_used_bytes": 0, "memory_limit_bytes": 1,
            "experts": [[0, e] for e in range(8)], "queue_depth": 0, "calls_served": 0, "tokens_served": 0,
            "errors": 0}
    await nc.publish(subjects.host_status("x"), json.dumps(fake).encode())
    await nc.publish(subjects.infer(node), json.dumps({"input_ids": [5, 6], "max_tokens": 4096}).encode())
    await nc.flush()
    reply, _ = await ask(nc, node, b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    assert reply["error"]["code"] == "invalid_json"
    gating = cluster.gatings["a"]
    assert not gating.engine.active, "the request without a reply subject was not decoded"
    assert "a.b" not in str(gating.lockstep.experts.directory.route(0, list(range(8))))
    good = prompts(3, 5)
    replies = await asyncio.gather(*(ask(nc, node, {"input_ids": p, "max_tokens": 5}) for p in good))
    assert [r["token_ids"] for r, _ in replies] == reference(mixtral_dir, good, 5)


async def test_stopping_a_gating_answers_every_running_request(cluster: LocalCluster, mixtral_dir: Path) -> None:
    """Requests longer than the drain bound get `shutting_down`, not silence."""
    await cluster.add_node("a")
    await cluster.add_host("a", "h", mixtral_dir, "*:*")
    gating = await cluster.add_gating("a", mixtral_dir, drain_timeout_s=0.2)
    nc = await cluster.connect("a")
    asks = [asyncio.create_task(ask(nc, cluster.node("a"), {"input_ids": [5 + i, 6], "max_tokens": 250}))
            for i in range(3)]
    async with asyncio.timeout(10):
        while len(gating.engine.active) < 3:  # noqa: ASYNC110 - filled by the gating's intake
            await asyncio.sleep(0.01)
    await gating.stop()
    async with asyncio.timeout(5):
        replies = await asyncio.gather(*asks)
    for reply, headers in replies:
        assert reply["error"]["code"] == "shutting_down"
        assert headers["Nats-Service-Error-Code"] == "503"
    assert not gating.engine.active
    assert gating.engine.cache.num_free() == gating.engine.cache.max_slots


async def test_lost_expert_fails_only_the_requests_that_need_it(cluster: LocalCluster, mixtral_dir: Path) -> None:
    """Expert (0, 7) lives only on host `only`; killing it fails exactly the requests routed to it."""
    await cluster.add_node("a")
    await cluster.add_host("a", "rest", mixtral_dir, "0:0-6,1:*")
    only = await cluster.add_host("a", "only", mixtral_dir, "0:7")
    await cluster.add_gating("a", mixtral_dir, expert_timeout_s=1.0)
    await cluster.settle()
    needs, avoids = split_by_expert(mixtral_dir, layer=0, expert=7)
    await only.nc.close()  # abrupt: the server drops its subscriptions
    nc = await cluster.connect("a")
    node = cluster.node("a")
    async with asyncio.timeout(10):
        failed, served = await asyncio.gather(
            ask(nc, node, {"input_ids": needs, "max_tokens": 2}), ask(nc, node, {"input_ids": avoids, "max_tokens": 2})
        )
        # alone, its later layers see a step with no live token at all
        alone, _ = await ask(nc, node, {"input_ids": needs, "max_tokens": 2})
    for reply in (failed[0], alone):
        assert reply["error"]["code"] == "expert_unavailable", reply
        assert "expert 0.7" in reply["error"]["message"]
    assert served[0]["token_ids"] == reference(mixtral_dir, [avoids], 2)[0]


async def test_a_hung_host_fails_its_requests_within_one_timeout(cluster: LocalCluster, mixtral_dir: Path) -> None:
    """A host that takes its batches and never answers: the request fails with `expert_unavailable`
    within the expert timeout; the fallback to the experts' own subjects gets no second timeout."""
    from shared import subjects
    from shared.schemas import HostStatus

    await cluster.add_node("a")
    await cluster.add_gating("a", mixtral_dir, expert_timeout_s=1.0)
    hung = await cluster.connect("a")
    name = f"{cluster.prefix}-hung"
    await hung.subscribe(subjects.host_calls(name))  # takes every message, answers none
    status = HostStatus(host=name, node=cluster.node("a"), device="cpu", memory_used_bytes=0, memory_limit_bytes=1,
                        experts=[(layer, e) for layer in (0, 1) for e in range(8)], queue_depth=0, calls_served=0,
                        tokens_served=0, errors=0)
    directory = cluster.gatings["a"].lockstep.experts.directory
    async with asyncio.timeout(5):
        while directory.route(0, [0])[1]:  # until the gating routes to the hung host
            await hung.publish(subjects.host_status(name), status.model_dump_json().encode())
            await asyncio.sleep(0.05)
    started = time.monotonic()
    reply, _ = await ask(await cluster.connect("a"), cluster.node("a"), {"input_ids": [5, 6], "max_tokens": 2})
    assert reply["error"]["code"] == "expert_unavailable", reply
    assert time.monotonic() - started < 1.8, "one timeout (1 s), not one for the host and one for the fallback"


def split_by_expert(model_dir: Path, layer: int, expert: int) -> tuple[list[int], list[int]]:
    """Two short prompts: one whose greedy run (2 tokens) routes a token to (layer, expert), one that never does."""
    from shared.model.generate import generate
    from shared.model.model import MoEModel
    from shared.model.moe import LocalExperts, MoECall
    from shared.model.sampling import SamplingParams

    model, experts = MoEModel.from_checkpoint(model_dir), LocalExperts.from_checkpoint(model_dir)
    found: dict[bool, list[int]] = {}
    for candidate in prompts(200, seed=5):
        prompt = candidate[:3]
        hit = False

        def recording(call: MoECall) -> object:
            nonlocal hit
            hit = hit or (call.layer == layer and bool((call.expert_ids == expert).any()))
            return experts(call)

        generate(model, recording, [prompt], 2, SamplingParams(), eos_token_id=[])  # type: ignore[arg-type]
        found.setdefault(hit, prompt)
        if len(found) == 2:
            return found[True], found[False]
    raise AssertionError("no prompt pair found")


async def test_one_message_per_host_and_layer(cluster: LocalCluster, mixtral_dir: Path) -> None:
    """With host heartbeats known, a layer's groups travel in one message per holding host."""
    await spread(cluster, mixtral_dir)
    gating = cluster.gatings["a"]
    experts = gating.lockstep.experts
    async with asyncio.timeout(10):  # the directory learns both of a's hosts from their heartbeats
        while experts.directory.route(0, list(range(8)))[1]:  # noqa: ASYNC110 - fed by real heartbeats
            await asyncio.sleep(0.05)
    batch = prompts(8, seed=9)
    before, steps = experts.messages, gating.engine.steps
    nc = await cluster.connect("a")
    replies = await asyncio.gather(*(ask(nc, cluster.node("a"), {"input_ids": p, "max_tokens": 6}) for p in batch))
    assert [r["token_ids"] for r, _ in replies] == reference(mixtral_dir, batch, 6)
    moe_calls = (gating.engine.steps - steps) * 2  # two MoE layers per step
    assert experts.messages - before <= 2 * moe_calls, "at most one message per host (a0, a1) and layer"
