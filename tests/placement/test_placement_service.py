"""The placement service over real NATS: an informed plan, none while steady, a new one after a shift."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest

from services.placement.planner import ClusterView, cluster_view
from services.placement.service import PlacementService, build
from services.placement.settings import PlacementSettings
from shared import subjects
from shared.activations import ActivationReport, StepLoad
from shared.model.checkpoint import load_config
from shared.model.config import list_moe_layers
from shared.nats_server import NatsServer
from shared.schemas import HostStatus
from tests.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("placement-model"), seed=3)


def usage(hot: list[int], num_experts: int) -> np.ndarray:
    """An expert distribution that puts most weight on `hot`."""
    p = np.full(num_experts, 0.02)
    p[hot] = 1.0
    return p / p.sum()


async def send_reports(nc: nats.NATS, node: str, layers: list[int], p: np.ndarray, *, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        counts = np.stack([rng.multinomial(128, p) for _ in layers]).astype(np.int64)  # 64 tokens, top-2
        report = ActivationReport(node, 1.0, layers, counts, np.full(len(layers), 64, dtype=np.int64))
        await nc.publish(subjects.activations(node), report.encode())
    await nc.flush()


async def register_hosts(
    nc: nats.NATS, nodes: list[str], expert_bytes: int, slots: int, plan: dict | None = None
) -> None:
    """Heartbeats of one host per node; with `plan`, the hosts report holding what it assigns them
    (standing in for the migrator and the hosts applying it)."""
    for node in nodes:
        held = [tuple(k) for k in (plan or {}).get("hosts", {}).get(f"{node}-h0", [])]
        status = HostStatus(
            host=f"{node}-h0",
            node=node,
            device="cpu",
            memory_used_bytes=len(held) * expert_bytes,
            memory_limit_bytes=slots * expert_bytes,
            experts=held,
            queue_depth=0,
            calls_served=0,
            tokens_served=0,
            errors=0,
        )
        await nc.publish(subjects.host_status(status.host), status.model_dump_json().encode())
    await nc.flush()


async def until_held(service: PlacementService) -> None:
    """Until the service has seen (heartbeats) every host of its plan holding it: no migration in flight."""

    def missing() -> set[str]:
        return set((service.plan or {}).get("hosts", {})) - {s.host for s in service.live_hosts()}

    async with asyncio.timeout(10):
        while service._migration_in_flight() or missing():  # noqa: ASYNC110 - state fed by real messages
            await asyncio.sleep(0.02)


def tokens_seen(service: PlacementService) -> int:
    return sum(window.tokens for window in service.stats.nodes)


async def until_counted(service: PlacementService, tokens: int) -> None:
    """Until the service has counted `tokens` tokens since it started (reports are handled asynchronously)."""
    async with asyncio.timeout(10):
        while tokens_seen(service) < tokens:  # noqa: ASYNC110 - state fed by real messages
            await asyncio.sleep(0.02)


async def next_plan(service: PlacementService, after_epoch: int) -> dict:
    """The first plan in KV with an epoch above `after_epoch` (a KV watch, no polling)."""
    watcher = await service.plans.watch("plan")
    try:
        async with asyncio.timeout(15):
            while True:
                entry = await watcher.updates(timeout=15)
                if entry is not None and entry.value and json.loads(entry.value)["epoch"] > after_epoch:
                    return json.loads(entry.value)
    finally:
        await watcher.stop()


@contextlib.asynccontextmanager
async def running_service(
    hub: NatsServer, model_dir: Path, unique: str, nodes: list[str], **settings: Any
) -> AsyncIterator[tuple[nats.NATS, PlacementService]]:
    """A started placement service for `nodes` (own KV buckets) and a client connection; stops both."""
    config = PlacementSettings(
        nodes=",".join(nodes), model=model_dir, plans_bucket=f"{unique}-plans", hosts_bucket=f"{unique}-hosts",
        **settings,
    )
    nc = await nats.connect(hub.cfg.client_url())
    service = await build(nc, config)
    await service.start()
    try:
        yield nc, service
    finally:
        await service.stop()
        await nc.close()


async def test_plans_follow_shifts_not_noise(nats_hub: NatsServer, model_dir: Path, unique: str) -> None:
    nodes = [f"{unique}-a", f"{unique}-b"]
    async with running_service(
        nats_hub, model_dir, unique, nodes, policy="prism", plan_interval_s=0.2, dtype="float32"
    ) as (nc, service):
        config = load_config(model_dir)
        layers, E = list_moe_layers(config), config.num_experts
        code, prose = usage([0, 1, 2], E), usage([5, 6, 7], E)
        await send_reports(nc, nodes[0], layers, code, n=20, seed=1)
        await send_reports(nc, nodes[1], layers, prose, n=20, seed=2)
        await register_hosts(nc, nodes, service.model.expert_bytes, slots=len(layers) * E * 5 // 8)
        first = await next_plan(service, 0)
        await register_hosts(nc, nodes, service.model.expert_bytes, slots=len(layers) * E * 5 // 8, plan=first)
        held = {host: {tuple(x) for x in experts} for host, experts in first["hosts"].items()}
        assert {(layers[0], 0), (layers[0], 1)} <= held[f"{nodes[0]}-h0"], "node a's hot experts stay local"
        assert {(layers[0], 6), (layers[0], 7)} <= held[f"{nodes[1]}-h0"]

        await send_reports(nc, nodes[0], layers, code, n=30, seed=3)  # steady: same workload, new noise
        await send_reports(nc, nodes[1], layers, prose, n=30, seed=4)
        await nc.flush()
        await until_held(service)
        assert not await service.plan_once(), "a steady workload must not move experts"
        assert service.plan["epoch"] == first["epoch"]

        await send_reports(nc, nodes[0], layers, prose, n=12, seed=5)  # node a switches domain
        await send_reports(nc, nodes[1], layers, code, n=12, seed=6)  # and node b the other way
        # Each node's shift may be its own re-plan (a's is detected first); stand in for the migrator
        # by reporting each plan as held, and expect a's new hot set on a within those plans.
        plan, plans = first, 0
        while plans < 2:
            plan = await next_plan(service, plan["epoch"])
            plans += 1
            await register_hosts(nc, nodes, service.model.expert_bytes, slots=len(layers) * E * 5 // 8, plan=plan)
            held = {host: {tuple(x) for x in experts} for host, experts in plan["hosts"].items()}
            if {(layers[0], 6), (layers[0], 7)} <= held[f"{nodes[0]}-h0"]:
                break
        assert {(layers[0], 6), (layers[0], 7)} <= held[f"{nodes[0]}-h0"], "after the shift a's new hot set is local"
        assert {(layers[0], 0), (layers[0], 1)} <= held[f"{nodes[1]}-h0"] or plans < 2, "and b's"

        # the migrator gives an epoch up: the service plans from what the hosts hold, at once
        await register_hosts(nc, nodes, service.model.expert_bytes, slots=len(layers) * E * 5 // 8, plan=first)
        async with asyncio.timeout(5):
            while not service._migration_in_flight():  # noqa: ASYNC110 - until it sees the hosts hold `first`
                await asyncio.sleep(0.02)
        failed = {"epoch": plan["epoch"], "ok": False, "steps": 0, "error": "host gone"}
        await nc.publish(subjects.PLAN_EVENTS, json.dumps(failed).encode())
        # (the hosts still hold the first plan, for the old workload: re-placing pays; without the
        # event the service would wait migration_timeout_s for the given-up epoch)
        assert service.settings.migration_timeout_s >= 60
        await next_plan(service, plan["epoch"])


async def test_replan_command_and_bad_commands(nats_hub: NatsServer, model_dir: Path, unique: str) -> None:
    async with running_service(nats_hub, model_dir, unique, [f"{unique}-a"], plan_interval_s=3600) as (nc, service):
        config = load_config(model_dir)
        slots = len(list_moe_layers(config)) * config.num_experts
        await register_hosts(nc, [f"{unique}-a"], service.model.expert_bytes, slots=slots)
        first = await next_plan(service, 0)  # a new host triggers the first plan
        await register_hosts(nc, [f"{unique}-a"], service.model.expert_bytes, slots=slots, plan=first)
        await until_held(service)
        reply = json.loads((await nc.request(subjects.PLACEMENT_CMD, b'{"kind": "replan"}', timeout=10)).data)
        assert reply == {"epoch": 1, "published": False}  # nothing new to justify a move
        bad = await nc.request(subjects.PLACEMENT_CMD, b'{"kind": "dance"}', timeout=10)
        assert json.loads(bad.data)["error"]["code"] == "invalid_request"
        assert bad.headers["Nats-Service-Error-Code"] == "400"


async def test_the_service_answers_while_a_policy_solves(nats_hub: NatsServer, model_dir: Path, unique: str) -> None:
    """A policy takes seconds on a big cluster (`route`: 7 s at 16 nodes of DeepSeek-V3's shape). It
    ran on the service's event loop, so commands, heartbeats and reports waited for the whole solve;
    it runs on the planning thread now. The solve below is a real policy behind a 2 s wait."""
    nodes = [f"{unique}-a"]
    async with running_service(nats_hub, model_dir, unique, nodes, plan_interval_s=3600) as (nc, service):
        config = load_config(model_dir)
        layers, E = list_moe_layers(config), config.num_experts
        await send_reports(nc, nodes[0], layers, usage([0, 1], E), n=10, seed=1)
        await register_hosts(nc, nodes, service.model.expert_bytes, slots=len(layers) * E)
        first = await next_plan(service, 0)  # the first plan, made when the host appeared
        await register_hosts(nc, nodes, service.model.expert_bytes, slots=len(layers) * E, plan=first)
        await until_held(service)
        policy, solving, solved = service.policy, threading.Event(), threading.Event()

        def slow(*args: Any, **kwargs: Any) -> Any:
            solving.set()
            time.sleep(2.0)
            solved.set()
            return policy(*args, **kwargs)

        service.policy = slow
        planning = asyncio.ensure_future(service.plan_once())
        assert await asyncio.to_thread(solving.wait, 10)
        before = tokens_seen(service)
        bad = await nc.request(subjects.PLACEMENT_CMD, b'{"kind": "dance"}', timeout=1.0)
        assert json.loads(bad.data)["error"]["code"] == "invalid_request"
        await send_reports(nc, nodes[0], layers, usage([0, 1], E), n=3, seed=2)
        await until_counted(service, before + 3 * 64)
        assert not solved.is_set()  # all of it answered and counted while the policy was still solving
        await planning


async def test_a_lost_node_is_planned_around_at_once(nats_hub: NatsServer, model_dir: Path, unique: str) -> None:
    """Node b's only host stops: once its heartbeats are older than host_ttl_s, the next plan puts every
    expert on the hosts left, without waiting for the migration timeout (b's host was not 'migrating'),
    and planning goes on although node b, still sending requests, has no host at all."""
    nodes = [f"{unique}-a", f"{unique}-b"]
    async with running_service(
        nats_hub, model_dir, unique, nodes, plan_interval_s=0.2, host_ttl_s=1.0, dtype="float32"
    ) as (nc, service):
        assert service.settings.migration_timeout_s >= 60
        config = load_config(model_dir)
        layers, E = list_moe_layers(config), config.num_experts
        slots = len(layers) * E  # room for the whole model on each host
        await send_reports(nc, nodes[0], layers, usage([0, 1], E), n=5, seed=1)
        await send_reports(nc, nodes[1], layers, usage([5, 6], E), n=5, seed=2)
        await register_hosts(nc, nodes, service.model.expert_bytes, slots)
        first = await next_plan(service, 0)
        await register_hosts(nc, nodes, service.model.expert_bytes, slots, plan=first)
        assert set(first["hosts"]) == {f"{nodes[0]}-h0", f"{nodes[1]}-h0"}

        async def node_a_lives() -> None:  # only a's host keeps beating; b's is gone
            while True:
                await register_hosts(nc, nodes[:1], service.model.expert_bytes, slots, plan=first)
                await asyncio.sleep(0.2)

        beating = asyncio.create_task(node_a_lives())
        try:
            await send_reports(nc, nodes[1], layers, usage([5, 6], E), n=5, seed=3)  # b still asks
            started = asyncio.get_running_loop().time()
            second = await next_plan(service, first["epoch"])
            assert asyncio.get_running_loop().time() - started < 10
        finally:
            beating.cancel()
        assert set(second["hosts"]) == {f"{nodes[0]}-h0"}
        held = {tuple(k) for k in second["hosts"][f"{nodes[0]}-h0"]}
        assert held == {(layer, e) for layer in layers for e in range(E)}, "every expert has a holder again"



@pytest.mark.parametrize("policy", ["eplb", "redundance", "latency", "uniform", "route"])
async def test_a_new_policy_takes_over_by_its_own_measure(
    nats_hub: NatsServer, model_dir: Path, unique: str, policy: str
) -> None:
    """The placement service restarts with another policy while the hosts hold `prism`'s plan: the new
    policy's first plan is taken as it is (judged by remote calls, as all plans once were, `eplb`, which
    spreads load and ignores locality, never took over). Once in place, its plans are judged by what it
    minimises (objectives.judge), and a steady workload moves nothing."""
    nodes = [f"{unique}-a", f"{unique}-b"]
    config = load_config(model_dir)
    layers, E = list_moe_layers(config), config.num_experts
    slots = len(layers) * E * 5 // 8

    async def busy_a_quiet_b(nc: nats.NATS, service: PlacementService, seed: int) -> None:
        before = tokens_seen(service)
        await send_reports(nc, nodes[0], layers, usage([0, 1], E), n=40, seed=seed)
        await send_reports(nc, nodes[1], layers, usage([2, 3], E), n=5, seed=seed + 1)
        await until_counted(service, before + 45 * 64)

    async with running_service(nats_hub, model_dir, unique, nodes, policy="prism", plan_interval_s=3600) as (
        nc, service
    ):
        await busy_a_quiet_b(nc, service, seed=1)
        await register_hosts(nc, nodes, service.model.expert_bytes, slots)
        in_place = await next_plan(service, 0)
    async with running_service(nats_hub, model_dir, unique, nodes, policy=policy, plan_interval_s=3600) as (
        nc, service
    ):
        await register_hosts(nc, nodes, service.model.expert_bytes, slots, plan=in_place)
        await until_held(service)
        await busy_a_quiet_b(nc, service, seed=3)
        assert await service.plan_once(), f"{policy} must take over from prism's plan"
        assert service.plan["policy"] == policy  # (`latency` may keep prism's hosts: moving would not pay)
        await register_hosts(nc, nodes, service.model.expert_bytes, slots, plan=service.plan)
        await until_held(service)
        await busy_a_quiet_b(nc, service, seed=5)  # the same workload, new noise
        assert not await service.plan_once(), "a steady workload must not move experts"



async def test_planning_rounds_at_once_publish_one_plan_per_epoch(
    nats_hub: NatsServer, model_dir: Path, unique: str
) -> None:
    """Replan commands while the plan loop runs: one plan per epoch, not several plans numbered 1."""
    nodes = [f"{unique}-a"]
    async with running_service(nats_hub, model_dir, unique, nodes, plan_interval_s=3600) as (nc, service):
        assert service._loop_task is not None
        service._loop_task.cancel()  # the rounds below start together, none before the others
        config = load_config(model_dir)
        layers, E = list_moe_layers(config), config.num_experts
        await send_reports(nc, nodes[0], layers, usage([0, 1], E), n=5, seed=1)
        await register_hosts(nc, nodes, service.model.expert_bytes, slots=len(layers) * E)
        async with asyncio.timeout(5):
            while not service.live_hosts():  # noqa: ASYNC110 - state fed by real messages
                await asyncio.sleep(0.02)
        published = await asyncio.gather(*(service.plan_once() for _ in range(3)))
        epochs = [json.loads(entry.value)["epoch"] for entry in await service.plans.history("plan")]
        assert sum(published) == len(epochs) == 1, f"epochs published: {epochs}"


async def test_a_failing_round_is_answered_and_planning_goes_on(
    nats_hub: NatsServer, model_dir: Path, unique: str
) -> None:
    """Only PlacementError was caught: anything else (a KV write while the hub restarts, a bug in a
    policy) ended the plan loop for good, silently, and left a replan command without an answer."""
    nodes = [f"{unique}-a", f"{unique}-b"]
    async with running_service(nats_hub, model_dir, unique, nodes, plan_interval_s=0.1) as (nc, service):
        config = load_config(model_dir)
        layers, E = list_moe_layers(config), config.num_experts
        slots = len(layers) * E * 5 // 8
        await send_reports(nc, nodes[0], layers, usage([0, 1], E), n=10, seed=1)
        await send_reports(nc, nodes[1], layers, usage([2, 3], E), n=10, seed=2)
        await register_hosts(nc, nodes, service.model.expert_bytes, slots)
        first = await next_plan(service, 0)
        await register_hosts(nc, nodes, service.model.expert_bytes, slots, plan=first)
        await until_held(service)
        policy = service.policy

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug in a policy")

        service.policy = broken
        reply = await nc.request(subjects.PLACEMENT_CMD, b'{"kind": "replan"}', timeout=10)
        assert json.loads(reply.data)["error"]["code"] == "internal"
        await asyncio.sleep(0.5)  # several rounds of the loop meet the same bug
        assert service._loop_task is not None
        assert not service._loop_task.done()
        service.policy = policy
        await send_reports(nc, nodes[0], layers, usage([2, 3], E), n=30, seed=3)  # the nodes swap domains:
        await send_reports(nc, nodes[1], layers, usage([0, 1], E), n=30, seed=4)  # worth a move
        assert (await next_plan(service, first["epoch"]))["epoch"] == first["epoch"] + 1


async def test_reports_from_an_unknown_node_are_logged_once(nats_hub: NatsServer, model_dir: Path, unique: str) -> None:
    """A typo in PRISM_PLACEMENT_NODES used to mean silence: the service dropped every report and never
    planned. The first report dropped from a node is a warning; later ones add nothing to the log."""
    from structlog.testing import capture_logs

    async with running_service(nats_hub, model_dir, unique, [f"{unique}-a"], plan_interval_s=3600) as (nc, service):
        config = load_config(model_dir)
        layers, E = list_moe_layers(config), config.num_experts
        with capture_logs() as logs:
            await send_reports(nc, f"{unique}-typo", layers, usage([0, 1], E), n=3, seed=1)
            await send_reports(nc, f"{unique}-a", layers, usage([0, 1], E), n=1, seed=2)
            await until_counted(service, 64)  # the known node's report came after the others
        dropped = [e for e in logs if e["event"] == "activation_reports_dropped"]
        assert [(e["node"], e["log_level"]) for e in dropped] == [(f"{unique}-typo", "warning")]


@pytest.fixture(scope="module")
def routed_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V2 tiny with 5 decoder layers: layer 0 dense, layers 1-4 with 8 routed experts (top-2)."""
    return make_tiny_checkpoint("deepseek_v2", tmp_path_factory.mktemp("routed-model"), seed=4, num_hidden_layers=5)


@pytest.mark.parametrize("policy", ["route", "pipeline"])
async def test_plans_carry_routes(nats_hub: NatsServer, routed_model_dir: Path, unique: str, policy: str) -> None:
    """Two nodes whose hosts hold 2.5 of the 4 MoE layers each, flat routing: a stay-home step would pay a
    round trip in most layers, a route two one-way hops. The plan names, per home, the executing node of
    every decoder layer (the dense layer 0 runs at home), and each home runs a layer only where all its
    experts are held. Old readers: the plan without routes is the same JSON as before."""
    from shared.schemas import parse_plan

    nodes = [f"{unique}-a", f"{unique}-b"]
    config = load_config(routed_model_dir)
    layers, E = list_moe_layers(config), config.num_experts
    assert (config.num_layers, layers) == (5, [1, 2, 3, 4])
    slots = len(layers) * E * 5 // 8
    async with running_service(nats_hub, routed_model_dir, unique, nodes, policy=policy, plan_interval_s=3600) as (
        nc, service
    ):
        await send_reports(nc, nodes[0], layers, usage(list(range(E)), E), n=10, seed=1)
        await send_reports(nc, nodes[1], layers, usage(list(range(E)), E), n=10, seed=2)
        await until_counted(service, 20 * 64)
        await register_hosts(nc, nodes, service.model.expert_bytes, slots)
        plan = await next_plan(service, 0)
        entry = await service.plans.get("plan")
    assert parse_plan(entry.value).routes == plan["routes"]
    assert plan["policy"] == policy
    routes = plan["routes"]
    assert set(routes) == set(nodes)
    held = {host.removesuffix("-h0"): {tuple(k) for k in keys} for host, keys in plan["hosts"].items()}
    for home, route in routes.items():
        assert len(route) == 5, route
        assert route[0] == home, route
        assert set(route) == set(nodes), f"{home}'s route leaves home for the layers it lacks: {route}"
        for layer in layers:
            assert {(layer, e) for e in range(E)} <= held[route[layer]], (home, layer, route)


async def test_the_workload_is_what_the_gatings_and_hosts_measured(
    nats_hub: NatsServer, model_dir: Path, unique: str
) -> None:
    """The policies price a step with each home's batch and step rate, the dense part of a layer and one
    expert invocation: from the gatings' reports and the hosts' heartbeats, not batch 1 on idle peers;
    and with each host's speed (its topology's), times as on a speed-1.0 host."""
    nodes = [f"{unique}-a", f"{unique}-b"]
    async with running_service(nats_hub, model_dir, unique, nodes, plan_interval_s=3600) as (nc, service):

        async def heartbeat(node: str, speed: float, calls: int, busy: float) -> None:
            status = HostStatus(host=f"{node}-h0", node=node, device="cpu", memory_used_bytes=0,
                                memory_limit_bytes=1 << 30, experts=[], queue_depth=0, calls_served=calls,
                                tokens_served=calls, errors=0, busy_s=busy, instance="x", speed=speed)
            await nc.publish(subjects.host_status(status.host), status.model_dump_json().encode())

        def view() -> ClusterView:
            return cluster_view(service.live_hosts(), nodes, service.model.expert_bytes, service.links)

        await heartbeat(nodes[0], 2.0, 50, 1.0)  # node a's GPU is twice the reference
        await heartbeat(nodes[1], 1.0, 0, 0.0)
        await nc.flush()
        async with asyncio.timeout(10):
            while len(service.live_hosts()) < 2:  # noqa: ASYNC110 - fed by real heartbeats
                await asyncio.sleep(0.02)
        assert view().cluster.host_speed.tolist() == [2.0, 1.0]
        blind = service._workload([0, 1], service.live_hosts(), service.links)
        assert blind.batch.tolist() == [1, 1]
        assert blind.step_rate is None
        assert blind.dense_time_s == 0
        layers = service.model.moe_layers
        sent = time.monotonic()
        for node, load in ((nodes[0], StepLoad(20, 80, 20 * 0.003, 20 * len(layers))),
                           (nodes[1], StepLoad(10, 10, 10 * 0.001, 10 * len(layers)))):
            counts = np.zeros((len(layers), service.model.num_experts), dtype=np.int64)
            counts[:, 0] = 8
            report = ActivationReport(node, 1.0, layers, counts, np.full(len(layers), 4, dtype=np.int64), load)
            for _ in range(3):
                await nc.publish(subjects.activations(node), report.encode())
        await heartbeat(nodes[0], 2.0, 250, 1.1)  # 200 calls in 0.1 s: 0.5 ms each at speed 2
        await nc.flush()
        async with asyncio.timeout(10):
            while service.load.measured([0, 1]).expert_time_s is None or tokens_seen(service) < 24:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        wl = service._workload([0, 1], service.live_hosts(), service.links)
        elapsed = time.monotonic() - sent
        assert wl.batch.tolist() == [4, 1]
        assert wl.dense_time_s == pytest.approx((60 * 0.003 * 2.0 + 30 * 0.001) / (90 * len(layers)))
        assert wl.expert_time_s == pytest.approx(0.001), "0.5 ms at speed 2: 1 ms on the reference"
        assert wl.step_rate is not None
        assert wl.step_rate[0] == pytest.approx(2 * wl.step_rate[1], rel=0.05)
        # node a's 60 steps since its first report's window (1 s) began: at least that second, at most
        # that second and the time since the reports were sent
        assert 60 / (1.0 + elapsed) <= wl.step_rate[0] <= 60 / 1.0


async def test_a_report_with_a_bad_load_is_dropped_and_the_next_counts(
    nats_hub: NatsServer, model_dir: Path, unique: str
) -> None:
    """A gating's report whose step load is not a count (NaN seconds, negative steps) is dropped whole
    with a warning; the service keeps counting what comes next."""
    import msgpack
    from structlog.testing import capture_logs

    node = f"{unique}-a"
    async with running_service(nats_hub, model_dir, unique, [node], plan_interval_s=3600) as (nc, service):
        layers, E = service.model.moe_layers, service.model.num_experts
        counts = np.zeros((len(layers), E), dtype=np.int64)
        counts[:, 0] = 128
        good = ActivationReport(node, 1.0, layers, counts, np.full(len(layers), 64, dtype=np.int64),
                                StepLoad(8, 8, 0.008, 8 * len(layers)))
        with capture_logs() as logs:
            for bad in ({"dense_s": float("nan")}, {"steps": -3}):
                await nc.publish(subjects.activations(node), msgpack.packb({**msgpack.unpackb(good.encode()), **bad}))
            await nc.publish(subjects.activations(node), good.encode())
            await until_counted(service, 64)
        assert [e["log_level"] for e in logs if e["event"] == "activation_report_dropped"] == ["warning", "warning"]
        assert tokens_seen(service) == 64, "only the good report counted"
        assert service.load.measured([0]).batch.tolist() == [1]
        assert service.load.measured([0]).dense_time_s == pytest.approx(0.001 / len(layers))
