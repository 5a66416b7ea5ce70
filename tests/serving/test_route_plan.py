"""A gating takes its node's route from the placement plan, once the plan's epoch is applied."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats

from services.gating.route_plan import RouteFollower
from services.gating.routes import Route
from shared import subjects
from tests.serving.conftest import LocalCluster, ask_all, reference
from tests.serving.test_serving import prompts


def follower(num_layers: int = 3) -> tuple[RouteFollower, list[tuple[Route | None, int]]]:
    taken: list[tuple[Route | None, int]] = []
    return RouteFollower("a", num_layers, lambda route, epoch: taken.append((route, epoch))), taken


def plan(epoch: int, routes: object = None, policy: str = "route") -> dict[str, object]:
    return {"epoch": epoch, "policy": policy, "hosts": {}, **({"routes": routes} if routes is not None else {})}


def test_a_new_plans_route_waits_for_its_epoch_to_be_applied() -> None:
    f, taken = follower()
    f.on_plan(plan(2, {"a": ["a", "b", "a"]}))
    assert taken == []
    f.on_applied({"epoch": 2, "ok": False, "steps": 0, "error": "x"})  # a failed migration: keep the old route
    assert taken == []
    f.on_applied({"epoch": 2, "ok": True, "steps": 3, "error": None})
    assert taken == [(("a", "b", "a"), 2)]


def test_the_plan_in_force_and_the_initial_plan_apply_at_once_and_stay_home_is_none() -> None:
    f, taken = follower()
    f.on_plan(plan(1, {"a": ["b", "b", "a"]}, policy="initial"))
    f.on_plan(plan(3, {"a": ["a", "a", "a"]}), current=True)
    f.on_plan(plan(2, {"a": ["b", "b", "b"]}), current=True)  # older than the route in force: ignored
    assert taken == [(("b", "b", "a"), 1), (None, 3)]


def test_an_event_before_its_plan_and_bad_routes() -> None:
    f, taken = follower()
    f.on_applied({"epoch": 4, "ok": True})
    f.on_plan(plan(4, {"b": ["b", "b", "b"]}))  # no route for a: every layer at home
    f.on_plan(plan(5, {"a": ["a", "b"]}))  # wrong length: refused, the route in force stays
    f.on_plan(plan(6, {"a": ["a", "b.c", "a"]}))  # not a node name
    f.on_plan(plan(7, ["a"]))
    f.on_plan("garbage")
    f.on_applied({"epoch": 5, "ok": True})
    assert taken == [(None, 4)]


async def test_a_gating_follows_the_route_of_an_applied_plan(
    cluster: LocalCluster, tmp_path: Path, unique: str
) -> None:
    from tests.checkpoints import make_tiny_checkpoint

    model = make_tiny_checkpoint("mixtral", tmp_path / "m", seed=3, num_hidden_layers=4)
    bucket = f"{unique}-plans"
    hub = await nats.connect(cluster.hub.cfg.client_url())
    try:
        kv = await hub.jetstream(domain=subjects.JETSTREAM_DOMAIN).create_key_value(bucket=bucket)
        for node in "ab":
            await cluster.add_node(node)
            await cluster.add_gating(node, model, embedded={f"{node}e": "*:*"}, plans_bucket=bucket)
        await cluster.settle()
        a, b = cluster.gatings["a"], cluster.gatings["b"]
        route = [cluster.node(n) for n in "abba"]
        await kv.put("plan", json.dumps(plan(7, {cluster.node("a"): route})).encode())
        await asyncio.sleep(0.3)
        assert a.route is None, "not before the migrator applied epoch 7"
        applied = {"epoch": 7, "ok": True, "steps": 0, "error": None}
        await hub.publish(subjects.PLAN_EVENTS, json.dumps(applied).encode())
        async with asyncio.timeout(10):
            while a.route is None:  # noqa: ASYNC110 - set by the real KV watch and event
                await asyncio.sleep(0.02)
        assert a.route == tuple(route)
        batch = prompts(3, seed=61)
        replies = await ask_all(cluster, ["a"] * 3, batch, 6)
        assert [r.get("token_ids") for r in replies] == reference(model, batch, max_tokens=6)
        assert b.segments is not None
        assert b.segments.runner.segments_run > 0, "node a's requests ran layers 1-2 on node b"
    finally:
        await hub.close()

