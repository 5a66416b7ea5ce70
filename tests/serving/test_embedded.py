"""Embedded expert hosts: the experts of a node's own devices live in its gating's process.

Over real NATS (hub + one leaf per node), for every supported family: greedy answers equal the model in
one process whatever mix of embedded hosts, process hosts and other nodes' hosts holds the experts; an
embedded host serves other nodes over the bus while its own gating decodes; experts move between
embedded and process hosts under load without a failed request; a lost process host fails only the
requests that need it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest
import torch
from nats.aio.msg import Msg

from services.gating.metrics import sample
from services.migrator.service import Migrator, build
from services.migrator.settings import MigratorSettings
from shared import subjects
from shared.activations import ActivationReport
from shared.errors import ExpertUnavailable
from shared.model.checkpoint import load_config
from shared.schemas import HostStatus
from tests.checkpoints import make_tiny_checkpoint
from tests.serving.conftest import LocalCluster, ask, ask_all, reference
from tests.serving.test_serving import prompts

pytestmark = pytest.mark.slow

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {f: make_tiny_checkpoint(f, tmp_path_factory.mktemp(f"emb-{f}"), seed=11) for f in FAMILIES}


async def all_embedded(cluster: LocalCluster, model: Path) -> None:
    await cluster.add_node("a")
    await cluster.add_gating("a", model, embedded={"ae": "*:*"})
    await cluster.settle()


async def two_embedded(cluster: LocalCluster, model: Path) -> None:
    """Node a's two devices (`prism up`'s default of two hosts per node): each embeds half of every
    layer's experts, so most calls need both."""
    await cluster.add_node("a")
    await cluster.add_gating("a", model, embedded={"ae": "*:0-3", "af": "*:4-7"})
    await cluster.settle()


async def mixed(cluster: LocalCluster, model: Path) -> None:
    """Node a: embedded ae (experts 0-2), process host a1 (3-5); node b: embedded be (6-7). Each node
    needs the other's experts: b reaches a's embedded host and a's process host over the bus."""
    await cluster.add_node("a")
    await cluster.add_node("b")
    await cluster.add_host("a", "a1", model, "*:3-5")
    await cluster.add_gating("a", model, embedded={"ae": "*:0-2"})
    await cluster.add_gating("b", model, embedded={"be": "*:6-7"})
    await cluster.settle()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["all-embedded", "two-embedded", "mixed"])
async def test_sixteen_concurrent_greedy_equal_in_process(
    cluster: LocalCluster, family: str, layout: str, family_dirs: dict[str, Path]
) -> None:
    model = family_dirs[family]
    await {"all-embedded": all_embedded, "two-embedded": two_embedded, "mixed": mixed}[layout](cluster, model)
    batch = prompts(16, seed=5)
    expected = reference(model, batch, max_tokens=10)
    nodes = ["a", "b"] * 8 if layout == "mixed" else ["a"] * 16
    replies = await ask_all(cluster, nodes, batch, 10)
    assert [r.get("token_ids") for r in replies] == expected
    ae = cluster.embedded("a", "ae")
    assert ae.counters.direct_calls > 0, "node a's own tokens reach its embedded experts by a direct call"
    if layout == "two-embedded":
        af = cluster.embedded("a", "af")
        assert af.counters.direct_calls > 0
        assert ae.counters.messages == af.counters.messages == 0, "nothing crossed the bus"
        counts = sample(cluster.gatings["a"])
        assert (counts.remote_calls, counts.messages) == (0, 0)
        assert counts.local_calls > 0
    elif layout == "all-embedded":
        assert ae.counters.messages == 0, "nothing crossed the bus"
        timings = replies[0]["timings"]
        assert timings["local_experts_s"] > 0
        assert timings["hop_wait_s"] == 0  # no route: every layer at home
        assert timings["remote_wait_s"] < timings["expert_wait_s"]
    else:
        assert ae.counters.messages > 0, "node b's batches for experts 0-2 were answered by a's embedded host"
        assert cluster.hosts["a1"].counters.messages > 0


async def test_embedded_host_serves_another_node_while_its_own_requests_decode(
    cluster: LocalCluster, family_dirs: dict[str, Path]
) -> None:
    model = family_dirs["mixtral"]
    await cluster.add_node("a")
    await cluster.add_node("b")
    await cluster.add_gating("a", model, embedded={"ae": "*:*"})
    await cluster.add_gating("b", model)  # no experts of its own: everything goes to a's embedded host
    await cluster.settle()
    ae = cluster.embedded("a", "ae")
    a_batch, b_batch = prompts(6, seed=8), prompts(6, seed=9)
    expected = reference(model, a_batch + b_batch, max_tokens=24)
    a_steps = cluster.gatings["a"].engine.steps
    replies = await ask_all(cluster, ["a"] * 6 + ["b"] * 6, a_batch + b_batch, 24)
    assert [r.get("token_ids") for r in replies] == expected
    status = await ask_status(cluster, "b", ae.settings.host)
    assert status.messages_served > 0
    assert status.direct_calls > 0
    assert status.messages_served == ae.counters.messages, "its stats tell the bus messages apart"
    assert cluster.gatings["a"].engine.steps > a_steps
    b_timings = replies[-1]["timings"]
    assert b_timings["local_experts_s"] == 0
    assert b_timings["remote_wait_s"] > 0


async def ask_status(cluster: LocalCluster, node: str, host: str) -> HostStatus:
    nc = await cluster.connect(node)
    msg = await nc.request(subjects.host_cmd(host), b'{"kind": "status"}', timeout=5)
    return HostStatus.model_validate_json(msg.data)


async def test_experts_move_between_embedded_and_process_hosts_under_load(
    cluster: LocalCluster, family_dirs: dict[str, Path], unique: str
) -> None:
    model = family_dirs["mixtral"]
    hub = await nats.connect(cluster.hub.cfg.client_url())
    settings = MigratorSettings(model=model, model_id=unique, plans_bucket=f"{unique}-p", weights_bucket=f"{unique}-w")
    migrator: Migrator = await build(hub, settings)
    await migrator.upload_weights()
    await cluster.add_node("a")
    await cluster.add_node("b")
    store = {"model_id": unique, "weights_bucket": f"{unique}-w"}
    a1 = await cluster.add_host("a", "a1", model, "", memory_limit_mb=1, **store)
    await cluster.add_gating("a", model, embedded={"ae": "*:*"})
    await cluster.add_gating("b", model, embedded={"be": ""})
    await cluster.settle()
    ae, be = cluster.embedded("a", "ae"), cluster.embedded("b", "be")
    for host in (ae, be):  # in the service the host gets these from its settings; here the test's
        host.settings = host.settings.model_copy(update=store)
        host.model_id = unique
    keys = sorted(ae.weights)
    over_budget: list[HostStatus] = []

    async def watch(msg: nats.aio.msg.Msg) -> None:
        status = HostStatus.model_validate_json(msg.data)
        if status.memory_used_bytes > status.memory_limit_bytes:
            over_budget.append(status)

    heartbeats = await hub.subscribe(subjects.ALL_HOST_STATUS, cb=watch)
    events = await hub.subscribe(subjects.PLAN_EVENTS)
    batch = prompts(8, seed=12)
    expected = reference(model, batch, 12)
    moved = asyncio.Event()
    replies: list[tuple[int, dict]] = []
    clients = {n: await cluster.connect(n) for n in ("a", "b")}

    async def stream(i: int) -> None:
        node = "a" if i % 2 else "b"
        while not moved.is_set():
            reply, _ = await ask(clients[node], cluster.node(node), {"input_ids": batch[i], "max_tokens": 12})
            replies.append((i, reply))

    streams = [asyncio.create_task(stream(i)) for i in range(8)]
    half = len(keys) // 2
    a1_keys = keys[half : half + 4]  # within a1's 1 MiB
    plan = {
        "epoch": 1,
        "hosts": {
            ae.settings.host: [list(k) for k in keys[:half]],  # embedded → process (a1) and across (be)
            a1.settings.host: [list(k) for k in a1_keys],
            be.settings.host: [list(k) for k in keys[half:]],
        },
    }
    await migrator.plans.put("plan", json.dumps(plan).encode())
    await migrator.start()
    async with asyncio.timeout(90):
        event = json.loads((await events.next_msg(timeout=90)).data)
        await asyncio.sleep(0.5)  # a few more requests on the new placement
        moved.set()
        await asyncio.gather(*streams)
    await heartbeats.unsubscribe()
    assert event["ok"] is True, event
    assert len(replies) >= 8
    for i, reply in replies:
        assert reply.get("token_ids") == expected[i], f"stream {i}: {reply.get('error')}"
    assert sorted(ae.weights) == keys[:half]
    assert sorted(a1.weights) == a1_keys
    assert sorted(be.weights) == keys[half:]
    assert not over_budget, over_budget[:1]
    await migrator.stop()
    await hub.close()


def experts_used(model: Path, prompt: list[int], max_tokens: int) -> set[int]:
    """Every routed expert the in-process model activates for `prompt` (prefill and decode)."""
    from shared.model.generate import generate
    from shared.model.model import MoEModel
    from shared.model.moe import LocalExperts, MoECall
    from shared.model.sampling import SamplingParams

    m = MoEModel.from_checkpoint(model)
    local = LocalExperts.from_checkpoint(model)
    used: set[int] = set()

    def record(call: MoECall) -> torch.Tensor:
        used.update(call.expert_ids.unique().tolist())
        return local(call)

    with torch.inference_mode():
        generate(m, record, [prompt], max_tokens, SamplingParams())
    return used


async def test_a_lost_process_host_fails_only_the_requests_that_need_it(
    cluster: LocalCluster, family_dirs: dict[str, Path]
) -> None:
    model = family_dirs["mixtral"]
    await cluster.add_node("a")
    a1 = await cluster.add_host("a", "a1", model, "*:6-7")  # the only holder of experts 6 and 7
    await cluster.add_gating("a", model, embedded={"ae": "*:0-5"}, expert_timeout_s=0.5)
    await cluster.settle()
    candidates = prompts(300, seed=13)
    needs = [experts_used(model, p, 2) for p in candidates]
    only_local = [p for p, used in zip(candidates, needs, strict=True) if used <= set(range(6))][:3]
    needs_lost = [p for p, used in zip(candidates, needs, strict=True) if used & {6, 7}][:3]
    assert only_local, "the seed gives prompts that need only experts 0-5"
    assert needs_lost, "and prompts that need 6 or 7"
    await a1.nc.close()  # the host's process is gone: no drain, no goodbye
    nc = await cluster.connect("a")
    node = cluster.node("a")
    async with asyncio.timeout(30):
        lost = await asyncio.gather(*(ask(nc, node, {"input_ids": p, "max_tokens": 2}) for p in needs_lost))
        kept = await asyncio.gather(*(ask(nc, node, {"input_ids": p, "max_tokens": 2}) for p in only_local))
    for reply, headers in lost:
        assert reply["error"]["code"] == ExpertUnavailable.code, reply
        assert headers.get("Nats-Service-Error-Code")
    assert [r["token_ids"] for r, _ in kept] == reference(model, only_local, 2)


async def test_each_embedded_host_counts_the_rows_it_computed(
    cluster: LocalCluster, family_dirs: dict[str, Path]
) -> None:
    """Two embedded hosts share every call of a decode step, computed in one loop: each host's counters
    hold exactly its own experts' rows (what the node's activation counts say went to them)."""
    model = family_dirs["mixtral"]
    await cluster.add_node("a")
    # no activation report while it runs: the test reads the counter's window itself
    await cluster.add_gating("a", model, embedded={"ae": "*:0-3", "af": "*:4-7"}, activation_interval_s=3600)
    await cluster.settle()
    gating = cluster.gatings["a"]
    ae, af = cluster.embedded("a", "ae"), cluster.embedded("a", "af")
    gating.counter.take(1.0)  # a new window
    rows_before = ae.counters.direct_tokens, af.counters.direct_tokens
    replies = await ask_all(cluster, ["a"] * 4, prompts(4, seed=12), 12)
    assert all("token_ids" in r for r in replies), replies
    counts = gating.counter.take(1.0).counts.sum(axis=0)  # per expert, summed over layers
    assert ae.counters.direct_tokens - rows_before[0] == counts[:4].sum() > 0
    assert af.counters.direct_tokens - rows_before[1] == counts[4:].sum() > 0


async def test_the_activation_reports_carry_the_nodes_steps(
    cluster: LocalCluster, family_dirs: dict[str, Path]
) -> None:
    """What the placement service turns into each home's batch and step rate: a gating's reports count
    its steps, the sequences in them, their dense compute over the MoE layers run and the requests
    finished."""
    model = family_dirs["mixtral"]
    await cluster.add_node("a")
    await cluster.add_gating("a", model, embedded={"ae": "*:*"}, activation_interval_s=0.2)
    await cluster.settle()
    nc = await cluster.connect("a")
    reports: list[ActivationReport] = []

    async def keep(msg: Msg) -> None:
        reports.append(ActivationReport.decode(msg.data))

    sub = await nc.subscribe(subjects.activations(cluster.node("a")), cb=keep)
    replies = await ask_all(cluster, ["a"] * 4, prompts(4, seed=14), 10)
    generated = sum(len(r["token_ids"]) for r in replies)
    async with asyncio.timeout(10):
        while (sum(r.load.sequences for r in reports) < generated  # noqa: ASYNC110 - fed by real reports
               or sum(r.load.finished for r in reports) < len(replies)):
            await asyncio.sleep(0.05)
    await sub.unsubscribe()
    assert sum(r.load.finished for r in reports) == len(replies), "each request counted once, when it finished"
    steps = sum(r.load.steps for r in reports)
    moe = len(load_config(model).moe_layers)
    assert 10 <= steps <= generated, "a step per token of the longest request at least; one per token at most"
    assert sum(r.load.sequences for r in reports) == generated, "each step's sequences, one per token"
    assert sum(r.load.dense_layers for r in reports) == steps * moe
    assert sum(r.load.dense_s for r in reports) > 0
