"""Runtime migration over real NATS: experts move from node a to node b while b serves, losing nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pytest
import torch

from services.expert_host.service import ExpertHost
from services.migrator.service import Migrator, build
from services.migrator.settings import MigratorSettings
from shared import subjects
from shared.schemas import HostStatus
from shared.weights import WeightsStore
from tests.serving.conftest import LocalCluster, ask, reference

pytestmark = pytest.mark.slow


async def test_experts_move_while_requests_run(cluster: LocalCluster, mixtral_dir: Path, unique: str) -> None:
    hub = await nats.connect(cluster.hub.cfg.client_url())
    settings = MigratorSettings(
        model=mixtral_dir, model_id=unique, plans_bucket=f"{unique}-plans", weights_bucket=f"{unique}-weights"
    )
    migrator: Migrator = await build(hub, settings)
    await migrator.upload_weights()
    await cluster.add_node("a")
    await cluster.add_node("b")
    store_kw = {"model_id": unique, "weights_bucket": f"{unique}-weights"}
    a0 = await cluster.add_host("a", "a0", mixtral_dir, "*:*", **store_kw)
    b0 = await cluster.add_host("b", "b0", mixtral_dir, "", **store_kw)
    await cluster.add_gating("b", mixtral_dir)
    await cluster.settle()
    for host in (a0, b0):  # the in-process hosts get the weights store like the real service does
        host.store = await WeightsStore.open(host.nc.jetstream(domain="hub"), f"{unique}-weights")

    nc = await cluster.connect("b")
    node = cluster.node("b")
    prompts = [[20 + i, 30 + i, 40 + i] for i in range(4)]
    expected = reference(mixtral_dir, prompts, 16)
    events = await hub.subscribe(subjects.PLAN_EVENTS)
    moved = asyncio.Event()
    in_flight, replies = 0, []

    async def client(prompt: list[int]) -> None:
        """Ask again and again until the move is over: some request is always in flight."""
        nonlocal in_flight
        while not moved.is_set():
            in_flight += 1
            reply, _ = await ask(nc, node, {"input_ids": prompt, "max_tokens": 16})
            in_flight -= 1
            replies.append((prompt, reply))

    clients = [asyncio.create_task(client(p)) for p in prompts]
    keys = sorted(a0.weights)
    plan = {
        "epoch": 1,
        "hosts": {
            a0.settings.host: [list(k) for k in keys[: len(keys) // 2]],
            b0.settings.host: [list(k) for k in keys],
        },
    }
    await migrator.plans.put("plan", json.dumps(plan).encode())
    await migrator.start()
    async with asyncio.timeout(60):
        event = json.loads((await events.next_msg(timeout=60)).data)
        in_flight_at_move = in_flight
        moved.set()
        await asyncio.gather(*clients)
    assert event["epoch"] == 1
    assert event["ok"] is True, event
    assert event["steps"] >= 2  # at least one load and one unload
    assert in_flight_at_move > 0, "the move happened while requests were being served"
    for prompt, reply in replies:
        assert reply.get("token_ids") == expected[prompts.index(prompt)], "no request failed or changed"
    assert sorted(b0.weights) == keys
    assert sorted(a0.weights) == keys[: len(keys) // 2]

    served_by_a = a0.counters.calls
    reply, _ = await ask(nc, node, {"input_ids": prompts[0], "max_tokens": 8})
    assert reply["token_ids"] == expected[0][:8]
    assert a0.counters.calls == served_by_a, "after the move node b serves itself"
    await migrator.stop()
    await hub.close()


async def test_refused_step_leaves_old_holders_serving(cluster: LocalCluster, mixtral_dir: Path, unique: str) -> None:
    hub = await nats.connect(cluster.hub.cfg.client_url())
    settings = MigratorSettings(
        model=mixtral_dir, model_id=unique, plans_bucket=f"{unique}-p", weights_bucket=f"{unique}-w"
    )
    migrator = await build(hub, settings)  # weights never uploaded: every load must fail
    await cluster.add_node("a")
    a0 = await cluster.add_host("a", "a0", mixtral_dir, "*:*")
    a1 = await cluster.add_host("a", "a1", mixtral_dir, "")
    a1.store = await WeightsStore.open(a1.nc.jetstream(domain="hub"), f"{unique}-w")
    await cluster.add_gating("a", mixtral_dir)
    await cluster.settle()
    keys = sorted(a0.weights)
    ok = await migrator.apply({"epoch": 3, "hosts": {a0.settings.host: [], a1.settings.host: [list(k) for k in keys]}})
    assert ok is False
    assert sorted(a0.weights) == keys, "nothing was unloaded"
    reply, _ = await ask(await cluster.connect("a"), cluster.node("a"), {"input_ids": [5, 6, 7], "max_tokens": 4})
    assert reply["token_ids"] == reference(mixtral_dir, [[5, 6, 7]], 4)[0]
    await hub.close()


async def migrator_and_host(
    cluster: LocalCluster, model: Path, unique: str, host_wait_s: float
) -> tuple[nats.NATS, Migrator, ExpertHost]:
    """A hub connection, a migrator (weights not uploaded yet) and host a0 on node a with layer 0."""
    hub = await nats.connect(cluster.hub.cfg.client_url())
    settings = MigratorSettings(
        model=model, model_id=unique, plans_bucket=f"{unique}-p", weights_bucket=f"{unique}-w", host_wait_s=host_wait_s
    )
    migrator = await build(hub, settings)
    await cluster.add_node("a")
    return hub, migrator, await cluster.add_host("a", "a0", model, "0:*")


async def test_plan_waits_for_a_host_that_is_still_starting(
    cluster: LocalCluster, mixtral_dir: Path, unique: str
) -> None:
    """A stack starts its hosts and the migrator side by side: the first plan must not fail because
    one host is not up yet; a host that never comes fails the plan after host_wait_s."""
    hub, migrator, a0 = await migrator_and_host(cluster, mixtral_dir, unique, host_wait_s=20)
    late = f"{cluster.prefix}-late"
    plan = {"epoch": 1, "hosts": {a0.settings.host: [[0, e] for e in range(8)], late: [[1, e] for e in range(8)]}}
    applying = asyncio.create_task(migrator.apply(plan))
    await asyncio.sleep(1.0)
    assert not applying.done()
    await cluster.add_host("a", "late", mixtral_dir, "1:*")
    assert await asyncio.wait_for(applying, 30) is True

    never = {**plan, "epoch": 2, "hosts": {**plan["hosts"], f"{cluster.prefix}-never": []}}
    quick = await build(hub, migrator.settings.model_copy(update={"host_wait_s": 0.5}))
    started = asyncio.get_running_loop().time()
    assert await quick.apply(never) is False
    assert asyncio.get_running_loop().time() - started < 10
    await hub.close()


async def test_bad_plans_fail_and_later_plans_still_apply(
    cluster: LocalCluster, mixtral_dir: Path, unique: str
) -> None:
    """Not JSON, a host that cannot exist (a spoofed heartbeat once put "a.b" into a plan), a malformed
    host map: each fails (or is skipped) and the migrator keeps watching."""
    hub, migrator, a0 = await migrator_and_host(cluster, mixtral_dir, unique, host_wait_s=0)
    events = await hub.subscribe(subjects.PLAN_EVENTS)
    await migrator.start()
    good = {"epoch": 3, "hosts": {a0.settings.host: [[0, e] for e in range(8)]}}
    await migrator.plans.put("plan", b"not json")  # skipped (logged): no event
    outcomes = {}
    for plan in ({"epoch": 1, "hosts": {"a.b": [[0, 1]]}}, {"epoch": 2, "hosts": [1]}, good):
        await migrator.plans.put("plan", json.dumps(plan).encode())
        event = json.loads((await events.next_msg(timeout=30)).data)
        outcomes[event["epoch"]] = event
    assert outcomes[1]["ok"] is False
    assert "cannot exist" in outcomes[1]["error"]
    assert outcomes[2]["ok"] is False
    assert "malformed plan" in outcomes[2]["error"]
    assert outcomes[3]["ok"] is True
    await migrator.stop()
    await hub.close()


async def test_a_host_that_stops_during_a_load_fails_the_epoch_at_once(
    cluster: LocalCluster, mixtral_dir: Path, unique: str
) -> None:
    """A host killed while it loads never answers: its heartbeats stop, and the epoch fails after
    host_ttl_s, not after command_timeout_s (which a slow but live load may need), nor after
    host_wait_s (which a host that is still starting may need)."""
    from shared.schemas import HostStatus

    hub, migrator, _ = await migrator_and_host(cluster, mixtral_dir, unique, host_wait_s=0)
    settings = {"host_ttl_s": 1.0, "command_timeout_s": 60, "host_wait_s": 30}
    migrator = await build(hub, migrator.settings.model_copy(update=settings))
    await migrator.start()
    doomed = await cluster.connect("a")
    name = f"{cluster.prefix}-doomed"
    status = HostStatus(host=name, node=cluster.node("a"), device="cpu", memory_used_bytes=0,
                        memory_limit_bytes=2**30, experts=[], queue_depth=0, calls_served=0, tokens_served=0,
                        errors=0).model_dump_json().encode()

    async def answer_status_only(msg: nats.aio.msg.Msg) -> None:  # takes the load, then "dies"
        if json.loads(msg.data)["kind"] == "status":
            await msg.respond(status)

    await doomed.subscribe(subjects.host_cmd(name), cb=answer_status_only)
    await doomed.publish(subjects.host_status(name), status)  # one heartbeat, then silence
    await doomed.flush()
    started = asyncio.get_running_loop().time()
    assert await migrator.apply({"epoch": 1, "hosts": {name: [[1, 0]]}}) is False
    assert asyncio.get_running_loop().time() - started < 10
    # gone for good, and named again by a plan made before the placement service noticed: the
    # migrator knows it stopped beating, so it does not wait host_wait_s for it to start
    await doomed.close()
    started = asyncio.get_running_loop().time()
    assert await migrator.apply({"epoch": 2, "hosts": {name: [[1, 0]]}}) is False
    assert asyncio.get_running_loop().time() - started < 10
    await migrator.stop()
    await hub.close()


async def test_a_host_answering_garbage_fails_the_epoch_and_says_so(
    cluster: LocalCluster, mixtral_dir: Path, unique: str
) -> None:
    """A host whose status is not a HostStatus (an old or broken build) made `apply` raise past its
    handler: nothing was announced, and the placement service waited migration_timeout_s (120 s)."""
    hub, migrator, _ = await migrator_and_host(cluster, mixtral_dir, unique, host_wait_s=10)  # (leaf interest)
    events = await hub.subscribe(subjects.PLAN_EVENTS)
    broken = await cluster.connect("a")
    name = f"{cluster.prefix}-broken"

    async def answer_garbage(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b'{"host": 1}')

    await broken.subscribe(subjects.host_cmd(name), cb=answer_garbage)
    await broken.flush()
    assert await migrator.apply({"epoch": 1, "hosts": {name: [[1, 0]]}}) is False
    event = json.loads((await events.next_msg(timeout=10)).data)
    assert (event["epoch"], event["ok"]) == (1, False)
    assert event["error"].startswith("internal: ")
    await broken.close()
    await hub.close()


async def test_a_command_lost_with_a_restarted_host_is_sent_again(
    cluster: LocalCluster, mixtral_dir: Path, unique: str
) -> None:
    """`prism up` restarts a host killed during a load within a few seconds, so its heartbeats hardly
    pause: the migrator waited command_timeout_s (60 s) for the lost command while experts were held
    nowhere. A new instance in the heartbeats now means the command is sent again."""
    from shared.schemas import HostStatus

    hub, migrator, _ = await migrator_and_host(cluster, mixtral_dir, unique, host_wait_s=10)
    migrator = await build(hub, migrator.settings.model_copy(update={"command_timeout_s": 60, "host_ttl_s": 5}))
    await migrator.start()
    name = f"{cluster.prefix}-phoenix"

    def status(instance: str, experts: list[tuple[int, int]]) -> bytes:
        return HostStatus(host=name, node=cluster.node("a"), device="cpu", memory_used_bytes=0,
                          memory_limit_bytes=2**30, experts=experts, queue_depth=0, calls_served=0,
                          tokens_served=0, errors=0, instance=instance).model_dump_json().encode()

    old, new = await cluster.connect("a"), await cluster.connect("a")
    loads: list[str] = []

    async def dies_during_load(msg: nats.aio.msg.Msg) -> None:
        if json.loads(msg.data)["kind"] == "status":
            await msg.respond(status("old", []))
        else:
            loads.append("old")  # ... and never answers: killed

    async def answers(msg: nats.aio.msg.Msg) -> None:
        command = json.loads(msg.data)
        if command["kind"] == "load":
            loads.append("new")
        await msg.respond(status("new", [tuple(k) for k in command.get("experts", [])]))

    sub = await old.subscribe(subjects.host_cmd(name), cb=dies_during_load)
    await old.publish(subjects.host_status(name), status("old", []))
    await old.flush()
    applying = asyncio.create_task(migrator.apply({"epoch": 1, "hosts": {name: [[1, 0]]}}))
    async with asyncio.timeout(15):
        while loads != ["old"]:  # noqa: ASYNC110 - real messages
            await asyncio.sleep(0.05)
    await sub.unsubscribe()  # the old process is gone; the new one beats at once
    await new.subscribe(subjects.host_cmd(name), cb=answers)
    await new.publish(subjects.host_status(name), status("new", []))
    await new.flush()
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(applying, 30) is True
    assert asyncio.get_running_loop().time() - started < 10
    assert loads == ["old", "new"]
    await migrator.stop()
    for nc in (old, new, hub):
        await nc.close()


async def host_command(nc: nats.NATS, host: ExpertHost, kind: str, keys: list[tuple[int, int]]) -> Any:
    command = {"kind": kind, "epoch": 1, "experts": [list(k) for k in keys]}
    msg = await nc.request(subjects.host_cmd(host.settings.host), json.dumps(command).encode(), timeout=30)
    return json.loads(msg.data)


async def test_a_load_fetches_several_at_once_admits_in_order_and_stops_at_the_budget_or_a_missing_expert(
    cluster: LocalCluster, mixtral_dir: Path, unique: str
) -> None:
    hub, migrator, _ = await migrator_and_host(cluster, mixtral_dir, unique, host_wait_s=5)
    await migrator.upload_weights()
    expert_mb = migrator.expert_bytes / 2**20
    a1 = await cluster.add_host("a", "a1", mixtral_dir, "", model_id=unique, weights_bucket=f"{unique}-w",
                                load_concurrency=4, memory_limit_mb=5.5 * expert_mb)
    a1.store = await WeightsStore.open(a1.nc.jetstream(domain="hub"), f"{unique}-w")
    nc = await cluster.connect("a")
    wanted = [(1, e) for e in range(8)]  # 8 experts, room for 5: the first 5 in order, then a refusal
    reply = await host_command(nc, a1, "load", wanted)
    assert reply["error"]["code"] == "over_budget"
    assert sorted(a1.weights) == wanted[:5]
    assert a1.status().memory_used_bytes <= a1.status().memory_limit_bytes
    checkpoint = checkpoint_experts(mixtral_dir)
    for key in wanted[:5]:  # what it fetched is the expert's own weights, each under its own name
        assert torch.equal(a1.weights[key].down, checkpoint[key].down)
    assert HostStatus.model_validate(await host_command(nc, a1, "unload", [(1, 4)])).experts == tuple(wanted[:4])
    # an expert the store does not have (layer 7 does not exist): the ones before it load, then the refusal
    reply = await host_command(nc, a1, "load", [(0, 0), (7, 0)])
    assert reply["error"]["code"] == "weights_unavailable"
    assert (0, 0) in a1.weights
    assert (7, 0) not in a1.weights
    fetches = [t for t in asyncio.all_tasks() if "fetch_expert" in repr(t.get_coro())]
    assert not fetches, "no fetch is left running"
    await hub.close()


def checkpoint_experts(model: Path) -> dict[tuple[int, int], Any]:
    from shared.model.moe import LocalExperts

    return LocalExperts.from_checkpoint(model).weights
