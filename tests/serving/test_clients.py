"""The public contract from the client side: streaming over NATS, and IoT devices over MQTT."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
import pytest

from shared import subjects
from tests.serving.conftest import LocalCluster, reference

pytestmark = pytest.mark.slow


async def test_streaming_sends_every_token_then_the_final_reply(cluster: LocalCluster, mixtral_dir: Path) -> None:
    await cluster.add_node("a")
    await cluster.add_host("a", "h", mixtral_dir, "*:*")
    await cluster.add_gating("a", mixtral_dir)
    nc = await cluster.connect("a")
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    prompt = [7, 8, 9, 10]
    body = {"input_ids": prompt, "max_tokens": 6, "stream": True, "id": "s1"}
    await nc.publish(subjects.infer(cluster.node("a")), json.dumps(body).encode(), reply=inbox)
    chunks = []
    async with asyncio.timeout(20):
        while True:
            chunks.append(json.loads((await sub.next_msg(timeout=20)).data))
            if chunks[-1].get("done"):
                break
    final = chunks.pop()
    assert [c["index"] for c in chunks] == list(range(6))
    assert [c["token_id"] for c in chunks] == final["token_ids"] == reference(mixtral_dir, [prompt], 6)[0]
    assert all(c["id"] == "s1" for c in chunks)
    assert final["finish_reason"] == "length"
    assert final["timings"]["total_s"] >= final["timings"]["decode_s"] >= 0


async def test_mqtt_device_gets_its_answer(cluster: LocalCluster, mixtral_dir: Path, unique: str) -> None:
    await cluster.add_node("a")
    await cluster.add_host("a", "h", mixtral_dir, "*:*")
    await cluster.add_gating("a", mixtral_dir)
    mqtt_port = cluster.hub.cfg.mqtt_port
    assert mqtt_port is not None
    client_id = f"{unique}-dev"
    prompt = [11, 12, 13]
    async with aiomqtt.Client("127.0.0.1", mqtt_port, identifier=client_id) as client:
        await client.subscribe(subjects.mqtt_reply_topic(client_id))
        request = {"input_ids": prompt, "max_tokens": 4, "client_id": client_id}
        async with asyncio.timeout(20):
            # interest of the gating (on a leaf) reaches the hub asynchronously: repeat until answered
            while True:
                await client.publish(subjects.mqtt_infer_topic(cluster.node("a")), json.dumps(request).encode())
                try:
                    async with asyncio.timeout(2):
                        message = await anext(aiter(client.messages))
                    break
                except TimeoutError:
                    continue
        reply = json.loads(bytes(message.payload))  # type: ignore[arg-type]
        assert reply["token_ids"] == reference(mixtral_dir, [prompt], 4)[0]
        # a request that fails validation is answered on the device's reply topic too
        bad = {"input_ids": prompt, "max_tokens": 0, "client_id": client_id, "id": "bad-1"}
        await client.publish(subjects.mqtt_infer_topic(cluster.node("a")), json.dumps(bad).encode())
        async with asyncio.timeout(10):
            error = json.loads(bytes((await anext(aiter(client.messages))).payload))  # type: ignore[arg-type]
    assert error["id"] == "bad-1"
    assert error["error"]["code"] == "invalid_request"
    assert "max_tokens" in error["error"]["message"]



async def test_discovery_without_services_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A server where no Prism service runs: `prism status`, and `prism infer` without --node, say so
    and exit 1 (the server's "no responders" answer to a discovery ping is not a reply to parse)."""
    import argparse

    from cli.infer import infer
    from cli.status import status
    from shared.nats_server import NatsServer, ServerConfig, free_port

    async with NatsServer(ServerConfig(name="lonely", port=free_port()), tmp_path) as server:
        url = server.cfg.client_url()
        args = argparse.Namespace(url=url, user=None, password=None, wait=0.3, json=False, node=None)
        assert await status(args) == 1
        assert capsys.readouterr().err.startswith(f"error no_responders: no Prism service answered at {url}")
        assert await infer(args, {"prompt": "hi"}) == 1
        assert capsys.readouterr().err.startswith("error no_responders: no gating answered a ping")


def test_status_names_the_experts_no_live_host_holds() -> None:
    from cli.status import plan_coverage, render_coverage

    plan = {"epoch": 4, "hosts": {"a": [[0, 0], [0, 1]], "b": [[0, 2], [1, 0]], "gone": [[1, 1]]}}
    hosts = [{"experts": [[0, 0], [0, 1]]}, {"experts": [[0, 2], [1, 0], [0, 1]]}]
    coverage = plan_coverage(plan, hosts)
    assert coverage == {"epoch": 4, "experts": 5, "held_nowhere": [[1, 1]]}
    assert render_coverage(coverage) == "plan epoch 4: 5 experts, 1 held by no live host (1.1)"
    assert plan_coverage(None, hosts) is None


async def test_streamed_text_joins_to_the_final_text_when_a_character_is_left_incomplete(
    cluster: LocalCluster,
) -> None:
    """The demo model's byte-level tokenizer has tokens that are part of a UTF-8 character. A reply that
    ends on one: the stream decoder held the piece back and nobody flushed it, so the chunks lacked the
    final text's last character. (Seeds 18 and 25 end on such a token with this prompt.)"""
    from cli import DEMO_MODEL

    await cluster.add_node("a")
    await cluster.add_host("a", "h", DEMO_MODEL, "*:*")
    await cluster.add_gating("a", DEMO_MODEL)
    nc = await cluster.connect("a")
    for seed in (18, 25):
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        body = {"prompt": "int main(void) {", "max_tokens": 1, "temperature": 100.0, "seed": seed, "stream": True}
        await nc.publish(subjects.infer(cluster.node("a")), json.dumps(body).encode(), reply=inbox)
        parts = [json.loads((await sub.next_msg(timeout=20)).data) for _ in range(2)]
        await sub.unsubscribe()
        chunk, final = parts
        assert final["text"].endswith("\ufffd"), "the case under test: a character left incomplete"
        assert chunk["text"] == final["text"]
