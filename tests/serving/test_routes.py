"""Routes: a request's layers run on the nodes its route names, hidden states hopping one way.

Over real NATS (hub + one leaf per node, three nodes, each with an embedded host holding part of every
layer's experts): greedy answers through routes that visit every node, leave home and come back twice,
equal the model in one process, for 16 concurrent requests from all nodes; foreign KV is freed when
requests finish; a route change lets running requests finish on their old route; a node on a route that
stops answering fails only the requests routed through it, with `route_unavailable`, but a request
whose route reaches a node not serving segments starts again at home; bad segment messages get coded
errors and the node keeps serving.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from shared import subjects
from shared.codec import encode_tensor
from shared.model.checkpoint import load_config
from shared.schemas import GatingLoad
from tests.checkpoints import make_tiny_checkpoint
from tests.serving.conftest import LocalCluster, ask, ask_all, reference
from tests.serving.test_serving import prompts

pytestmark = pytest.mark.slow

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")
LAYERS = 5
# Per home: a leaves home twice (b, then c); b hops c -> a and comes home for its last layer; c sends
# its first two layers along a -> b and its fourth and fifth along b -> a.
ROUTES = {"a": "abaca", "b": "ccaab", "c": "abcba"}


@pytest.fixture(scope="session")
def route_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        f: make_tiny_checkpoint(f, tmp_path_factory.mktemp(f"route-{f}"), seed=13, num_hidden_layers=LAYERS)
        for f in FAMILIES
    }


async def three_nodes(cluster: LocalCluster, model: Path, routes: dict[str, str] = ROUTES) -> None:
    """Nodes a, b, c; each embeds a third of every layer's experts and routes its requests by `routes`."""
    experts = {"a": "*:0-2", "b": "*:3-5", "c": "*:6-7"}
    for node in experts:
        await cluster.add_node(node)
    for node, spec in experts.items():
        route = [cluster.node(n) for n in routes[node]]
        await cluster.add_gating(node, model, embedded={f"{node}e": spec}, route=route, expert_timeout_s=2.0,
                                 activation_interval_s=3600)  # the counts stay in the counter for the test
    await cluster.settle()


async def node_stats(cluster: LocalCluster) -> dict[str, GatingLoad]:
    """Each node's gating load, as its `$SRV.STATS` reply tells it."""
    nc = await cluster.connect(next(iter(cluster.leaves)))
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.STATS.{subjects.SERVICE_GATING}", b"", reply=inbox)
    loads = {}
    while len(loads) < len(cluster.gatings):
        reply = json.loads((await sub.next_msg(timeout=5)).data)
        load = GatingLoad.model_validate(reply["endpoints"][0]["data"]["load"])
        loads[load.node] = load
    await sub.unsubscribe()
    return loads


async def no_foreign_kv(cluster: LocalCluster, timeout_s: float = 5.0) -> None:
    """Every node frees the KV it kept for other nodes' requests (their homes release it), as its stats say."""
    async with asyncio.timeout(timeout_s):
        while any(load.foreign_kv for load in (await node_stats(cluster)).values()):  # noqa: ASYNC110 - real stats
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("family", FAMILIES)
async def test_sixteen_concurrent_greedy_through_routes_equal_in_process(
    cluster: LocalCluster, family: str, route_dirs: dict[str, Path]
) -> None:
    model = route_dirs[family]
    await three_nodes(cluster, model)
    batch = prompts(16, seed=21)
    expected = reference(model, batch, max_tokens=8)
    nodes = ["a", "b", "c", "a"] * 4
    replies = await ask_all(cluster, nodes, batch, 8)
    assert [r.get("token_ids") for r in replies] == expected
    for reply in replies:  # every route leaves home: part of each request's time is its hops'
        assert 0 < reply["timings"]["hop_wait_s"] < reply["timings"]["total_s"]
    loads = await node_stats(cluster)
    for node, gating in cluster.gatings.items():
        load = loads[cluster.node(node)]
        assert load.segments_run > 0, f"{node} ran no segment"
        assert load.segment_s > 0
        assert load.hops_sent > 0, f"{node} sent no hop"
        # Every layer's routing is counted by the home, wherever the layer ran: the same tokens each layer.
        tokens = list(gating.counter.tokens)
        assert tokens[0] > 0
        assert tokens == [tokens[0]] * len(tokens), (node, tokens)
        # Its own steps' load (the placement service's batch and step rate): only the MoE layers it runs
        # itself count as its dense layers; other nodes' segments are not its steps.
        steps = gating.engine.load.take()
        at_home = sum(ROUTES[node][layer] == node for layer in load_config(model).moe_layers)
        assert steps.steps > 0
        assert steps.dense_layers == steps.steps * at_home, (node, steps)
    await no_foreign_kv(cluster)


async def test_a_route_change_lets_running_requests_finish_on_their_old_route(
    cluster: LocalCluster, route_dirs: dict[str, Path]
) -> None:
    model = route_dirs["mixtral"]
    await three_nodes(cluster, model, routes={"a": "abaca", "b": "bbbbb", "c": "ccccc"})
    a = cluster.gatings["a"]
    first, second = prompts(4, seed=31), prompts(4, seed=32)
    expected = reference(model, first + second, max_tokens=24)
    nc = await cluster.connect("a")
    running = [asyncio.create_task(ask(nc, cluster.node("a"), {"input_ids": p, "max_tokens": 24})) for p in first]
    async with asyncio.timeout(30):
        while a.engine.steps < 3:  # noqa: ASYNC110 - they are decoding on route a-b-a-c-a
            await asyncio.sleep(0.005)
    a.route = tuple(cluster.node(n) for n in "aaacc")
    c_before = cluster.gatings["c"].segments.runner.segments_run  # type: ignore[union-attr]
    b_before = cluster.gatings["b"].segments.runner.segments_run  # type: ignore[union-attr]
    later = await ask_all(cluster, ["a"] * 4, second, 24)
    async with asyncio.timeout(60):
        done = [r for r, _ in await asyncio.gather(*running)]
    assert [r.get("token_ids") for r in done + later] == expected
    assert not a.engine.active
    assert cluster.gatings["c"].segments.runner.segments_run > c_before  # type: ignore[union-attr]
    assert cluster.gatings["b"].segments.runner.segments_run > b_before, "the old route still ran on b"  # type: ignore[union-attr]
    await no_foreign_kv(cluster)


async def test_a_node_on_the_route_that_stops_fails_only_the_requests_through_it(
    cluster: LocalCluster, route_dirs: dict[str, Path]
) -> None:
    model = route_dirs["mixtral"]
    # Every expert on every node, so that only the route decides who needs node c.
    for node in "abc":
        await cluster.add_node(node)
    routes = {"a": "abcca", "b": "bbbbb"}  # a's chain goes b -> c: b's forward to c is lost, a times out
    for node in "ab":
        await cluster.add_gating(node, model, embedded={f"{node}e": "*:*"}, route_retry_s=1.0,
                                 route=[cluster.node(n) for n in routes[node]], expert_timeout_s=1.0)
    c = await cluster.add_gating("c", model, embedded={"ce": "*:*"})
    await cluster.settle()
    await c.stop()  # node c's gating is gone
    del cluster.gatings["c"]
    loop = asyncio.get_running_loop()
    started = loop.time()
    replies = await ask_all(cluster, ["a", "b"], prompts(2, seed=41), 6)
    assert replies[0]["error"]["code"] == "route_unavailable", replies[0]
    assert "token_ids" in replies[1], replies[1]
    assert loop.time() - started < 3 * 1.0 + 5, "the failure came within the hop's timeout (3 x 1 s)"
    # New requests of node a stay home for route_retry_s (its experts are all there), then try the route again.
    a = cluster.gatings["a"]
    assert a.route is None
    again = await ask_all(cluster, ["a"], prompts(1, seed=42), 6)
    assert again[0]["token_ids"] == reference(model, prompts(1, seed=42), max_tokens=6)[0]
    async with asyncio.timeout(5):
        while a.route is None:  # noqa: ASYNC110 - the retry timer
            await asyncio.sleep(0.05)
    assert a.route == a.planned_route


async def test_a_request_whose_route_reaches_a_node_not_serving_starts_again_at_home(
    cluster: LocalCluster, route_dirs: dict[str, Path]
) -> None:
    """Node c has a leaf but no gating yet (a stack starting up, or c gone): a's route sends layers 1-3
    there first, and the server answers "no responders". The requests, which have no token yet, start
    again at home and get the model's answer instead of `route_unavailable`; new requests stay home for
    route_retry_s."""
    model = route_dirs["mixtral"]
    for node in "abc":
        await cluster.add_node(node)
    a = await cluster.add_gating("a", model, embedded={"ae": "*:*"}, route_retry_s=30.0,
                                 route=[cluster.node(n) for n in "accca"], expert_timeout_s=1.0)
    await cluster.settle()
    asked = prompts(3, seed=51)
    replies = await ask_all(cluster, ["a"] * 3, asked, 6)
    assert [r.get("token_ids") for r in replies] == reference(model, asked, max_tokens=6), replies
    assert a.restarted_at_home == 3
    assert a.route is None  # left for route_retry_s
    assert a.load().restarted_at_home == 3



async def test_a_cancel_in_the_window_before_a_restart_at_home_stops_the_request(
    cluster: LocalCluster, route_dirs: dict[str, Path]
) -> None:
    """A cancel that arrives after the engine has failed a request on a route whose node is not serving
    (so the engine cannot stop it) but before its reply task starts it again at home: the requester
    gets `cancelled` and nothing runs again. The window is one event-loop turn, so the test builds it:
    the request's failure is queued as the engine leaves it, then the cancel goes over NATS."""
    from services.gating.engine import ErrorEvent, Sequence
    from shared.errors import RouteNotServing
    from shared.model.sampling import SamplingParams
    from shared.schemas import InferRequest

    model = route_dirs["mixtral"]
    for node in "abc":
        await cluster.add_node(node)
    a = await cluster.add_gating("a", model, embedded={"ae": "*:*"}, route=[cluster.node(n) for n in "accca"])
    await cluster.settle()
    nc = await cluster.connect("a")
    inbox = nc.new_inbox()
    answers = await nc.subscribe(inbox)
    seq = Sequence([5, 6, 7], 4, SamplingParams(0.0, 1.0, None), route=a.route)
    seq.events.put_nowait(ErrorEvent(RouteNotServing(f"nothing serves segments on {cluster.node('c')}")))
    a._running[inbox] = [seq]
    cancel = await nc.request(subjects.cancel(cluster.node("a")), json.dumps({"reply_to": inbox}).encode(), timeout=5)
    assert json.loads(cancel.data) == {"cancelled": 0}  # the engine had finished it already
    await a._respond(seq, InferRequest(input_ids=[5, 6, 7], max_tokens=4), inbox)
    reply = json.loads((await answers.next_msg(timeout=5)).data)
    assert reply["error"]["code"] == "cancelled", reply
    assert a.restarted_at_home == 0
    assert not a.engine.active
    assert not a.engine.waiting


async def test_a_node_that_lost_a_requests_kv_fails_it_with_route_unavailable(
    cluster: LocalCluster, route_dirs: dict[str, Path]
) -> None:
    """As after a restart of the executing node's gating: the home's next step finds no KV there."""
    model = route_dirs["mixtral"]
    await three_nodes(cluster, model, routes={"a": "abbba", "b": "bbbbb", "c": "ccccc"})
    b = cluster.gatings["b"]
    assert b.segments is not None
    nc = await cluster.connect("a")
    running = asyncio.create_task(ask(nc, cluster.node("a"), {"input_ids": [5, 6, 7], "max_tokens": 200}))
    async with asyncio.timeout(30):
        while not b.segments.runner.slots:  # noqa: ASYNC110 - the request's first step reached node b
            await asyncio.sleep(0.005)
    b.segments.runner.release([sid for sid, _ in list(b.segments.runner.slots)])
    reply, _ = await asyncio.wait_for(running, 30)
    assert reply["error"]["code"] == "route_unavailable", reply
    assert "lost" in reply["error"]["message"] or "no KV" in reply["error"]["message"], reply


async def test_bad_segments_get_coded_errors_and_the_node_keeps_serving(
    cluster: LocalCluster, route_dirs: dict[str, Path]
) -> None:
    model = route_dirs["mixtral"]
    await three_nodes(cluster, model, routes={"a": "aaaaa", "b": "bbbbb", "c": "ccccc"})
    b, c = cluster.node("b"), cluster.node("c")
    hidden = cluster.gatings["b"].engine.model.config.hidden_size
    nc = await cluster.connect("a")
    ok_meta = {"home": cluster.node("a"), "seqs": ["x/1"], "counts": [2], "lens": [0], "chain": [[0, 2, b]]}
    cases = {
        "wrong shape": encode_tensor(torch.zeros(3, hidden), ok_meta),
        "wrong width": encode_tensor(torch.zeros(2, hidden + 1), ok_meta),
        "unknown request": encode_tensor(torch.zeros(2, hidden), {**ok_meta, "seqs": ["x/2"], "lens": [5]}),
        "another node's layers": encode_tensor(torch.zeros(2, hidden), {**ok_meta, "chain": [[0, 2, c]]}),
        "layers out of range": encode_tensor(torch.zeros(2, hidden), {**ok_meta, "chain": [[3, 9, b]]}),
        "no meta": encode_tensor(torch.zeros(2, hidden)),
        "not a tensor": b"\x93garbage",
    }
    for case, payload in cases.items():
        msg = await nc.request(subjects.route_segment(b), payload, timeout=5)
        code = json.loads(msg.data)["error"]["code"]
        assert code in {"bad_segment", "bad_tensor"}, (case, code)
        assert msg.headers is not None, case
        assert msg.headers.get("Nats-Service-Error-Code") == "400", case
    assert not cluster.gatings["b"].segments.runner.slots  # type: ignore[union-attr]  # nothing half-admitted
    # A good segment still runs, and the node still answers its own requests.
    msg = await nc.request(subjects.route_segment(b), encode_tensor(torch.randn(2, hidden), ok_meta), timeout=5)
    assert msg.headers is None or "Nats-Service-Error" not in msg.headers
    replies = await ask_all(cluster, ["b"], prompts(1, seed=51), 4)
    assert replies[0]["token_ids"] == reference(model, prompts(1, seed=51), max_tokens=4)[0]


async def test_segments_queued_at_a_stopping_node_are_answered_shutting_down(
    cluster: LocalCluster, route_dirs: dict[str, Path]
) -> None:
    """Not left to their homes' timeouts: a stopping gating answers what it will not run."""
    from services.gating.hops import _Pending
    from services.gating.routes import Segment
    from services.gating.segments import SegmentRequest

    model = route_dirs["mixtral"]
    await three_nodes(cluster, model, routes={"a": "aaaaa", "b": "bbbbb", "c": "ccccc"})
    b = cluster.gatings["b"]
    assert b.segments is not None
    nc = await cluster.connect("a")
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    hidden = torch.zeros(1, b.engine.model.config.hidden_size)
    req = SegmentRequest(cluster.node("a"), ["a/1"], [1], [0], [Segment(0, 2, cluster.node("b"))])
    b.segments._queue.append(_Pending(inbox, hidden, req, {}))  # waiting, as behind a long batch
    await b.stop()
    del cluster.gatings["b"]
    reply = await sub.next_msg(timeout=5)
    assert json.loads(reply.data)["error"]["code"] == "shutting_down"


async def test_a_segment_running_at_a_stopping_node_is_answered_shutting_down(
    cluster: LocalCluster, route_dirs: dict[str, Path]
) -> None:
    """A batch cut short by the stop (its expert has not answered yet) is answered too, not left to time out."""
    from services.gating.engine import ExpertsResult
    from services.gating.hops import SegmentService, _Pending
    from services.gating.routes import Segment
    from services.gating.segments import SegmentRequest, SegmentRunner
    from shared.model.model import MoEModel
    from shared.model.moe import MoECall

    await cluster.add_node("a")
    nc = await cluster.connect("a")
    asked = asyncio.Event()

    async def experts(call: MoECall, live: torch.Tensor | None) -> ExpertsResult:
        asked.set()
        await asyncio.Event().wait()  # an expert that answers after the stop
        raise AssertionError("unreachable")

    model = MoEModel.from_checkpoint(route_dirs["mixtral"])
    runner = SegmentRunner("b", model, experts, max_slots=2, max_len=32, idle_ttl_s=60, inline_max_tokens=64)
    service = SegmentService(nc, runner, hidden_size=model.config.hidden_size, max_payload=1 << 20)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    req = SegmentRequest("a", ["a/1"], [1], [0], [Segment(0, 2, "b")])
    service._queue.append(_Pending(inbox, torch.zeros(1, model.config.hidden_size), req, {}))
    serving = asyncio.create_task(service.serve())
    service._wake.set()
    await asyncio.wait_for(asked.wait(), 5)  # the batch is in its first MoE layer
    serving.cancel()
    reply = await sub.next_msg(timeout=5)
    assert json.loads(reply.data)["error"]["code"] == "shutting_down"
    assert runner.slots == {("a/1", 0): 0}  # its KV stays until released or expired, as for any failure
