"""Every error class of the API with its HTTP status and OpenAI's error body, through the `openai` client
(and raw HTTP where the client cannot send the bad input): 400, 401, 404, 413, 429 with Retry-After,
503 (expert_unavailable, shutting_down), 504; a request whose client leaves before the first token frees
its place; the API keeps serving after each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from services.api.server import HttpServer
from tests.api.conftest import ApiStack
from tests.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def far_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose only MoE layers are 4 and 5: no host on the hub holds an expert of them (the demo
    model's hosts answer layers 0-3), so its requests wait for experts that never answer."""
    return make_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("far"), num_hidden_layers=6,
                                mlp_only_layers=[0, 1, 2, 3], vocab_size=4096)


@pytest.fixture(scope="module")
async def api(stack: ApiStack) -> HttpServer:
    return await stack.add_api(node=stack.cluster.node("ok"), max_body_bytes=4096)


@pytest.fixture(scope="module")
async def client(stack: ApiStack, api: HttpServer) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=stack.url(api), api_key="unused", max_retries=0) as c:
        yield c


def assert_openai_error(exc: openai.APIStatusError, status: int, code: str, kind: str) -> dict[str, Any]:
    """The status and the body `{"error": {"message", "type", "param", "code"}}`."""
    assert exc.status_code == status
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["code"], body["error"]["type"]) == (code, kind)
    assert body["error"]["message"]
    return dict(body["error"])


async def still_serves(client: AsyncOpenAI) -> None:
    reply = await client.completions.create(model="demo", prompt="int x", max_tokens=2, temperature=0)
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 2


async def test_invalid_requests_are_400_and_name_the_field(client: AsyncOpenAI) -> None:
    cases: list[tuple[Callable[[], Any], str, str | None]] = [
        (lambda: client.completions.create(model="demo", prompt="x", temperature=3), "invalid_request", "temperature"),
        (lambda: client.completions.create(model="demo", prompt="x", max_tokens=0), "invalid_request", "max_tokens"),
        (lambda: client.completions.create(model="demo", prompt=["a", "b"]), "invalid_request", "prompt"),
        (lambda: client.completions.create(model="demo", prompt="x", n=2), "invalid_request", "n"),
        (lambda: client.completions.create(model="demo", prompt="x", extra_body={"bogus": 1}), "invalid_request",
         "bogus"),
        (lambda: client.completions.create(model="demo", prompt=[5000]), "token_out_of_range", None),
        (lambda: client.completions.create(model="demo", prompt=[1] * 300), "prompt_too_long", None),
        (lambda: client.chat.completions.create(model="demo", messages=[]), "invalid_request", "messages"),
    ]
    for call, code, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await call()
        error = assert_openai_error(caught.value, 400, code, "invalid_request_error")
        assert error["param"] == param, error
    await still_serves(client)


async def test_not_json_unknown_model_and_unknown_path(stack: ApiStack, api: HttpServer, client: AsyncOpenAI) -> None:
    async with httpx.AsyncClient(base_url=stack.url(api)) as http:
        reply = await http.post("/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert reply.status_code == 400
        assert reply.json()["error"]["code"] == "invalid_json"
        reply = await http.get("/nowhere")
        assert reply.status_code == 404
        assert reply.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.completions.create(model="gpt-4o", prompt="x")
    assert assert_openai_error(caught.value, 404, "model_not_found", "invalid_request_error")["param"] == "model"


async def test_bodies_over_the_limit_are_413_announced_or_chunked(
    stack: ApiStack, api: HttpServer, client: AsyncOpenAI
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        await client.completions.create(model="demo", prompt="x" * 5000)
    assert_openai_error(caught.value, 413, "payload_too_large", "invalid_request_error")

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"model": "demo", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    async with httpx.AsyncClient(base_url=stack.url(api)) as http:
        reply = await http.post("/completions", content=chunked(), headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert "content-length" not in reply.request.headers
    await still_serves(client)


async def test_experts_that_do_not_answer_are_503(stack: ApiStack, client: AsyncOpenAI, far_model: Path) -> None:
    await stack.add_gating_node("dead", far_model, expert_timeout_s=0.3)
    node = stack.cluster.node("dead")
    with pytest.raises(openai.InternalServerError) as caught:
        await client.completions.create(model="demo", prompt="x", max_tokens=2, extra_headers={"X-Prism-Node": node})
    assert_openai_error(caught.value, 503, "expert_unavailable", "server_error")
    with pytest.raises(openai.InternalServerError) as caught:
        await client.completions.create(model="demo", prompt="x", extra_headers={"X-Prism-Node": "nobody-here"})
    assert_openai_error(caught.value, 503, "no_responders", "server_error")
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model="demo", prompt="x", extra_headers={"X-Prism-Node": "a.b"})
    assert assert_openai_error(bad.value, 400, "invalid_request", "invalid_request_error")["param"] == "X-Prism-Node"


async def test_a_full_node_is_429_with_retry_after_and_clients_that_leave_free_their_places(
    stack: ApiStack, api: HttpServer, client: AsyncOpenAI, far_model: Path
) -> None:
    # one slot, one queue place, experts that never answer
    await stack.add_gating_node("slow", far_model, expert_timeout_s=5, max_batch=1, max_queue=1)
    node = stack.cluster.node("slow")
    body = {"model": "demo", "prompt": "x", "max_tokens": 4}
    async with httpx.AsyncClient(base_url=stack.url(api), headers={"X-Prism-Node": node}) as http:
        first = asyncio.create_task(http.post("/completions", json=body, timeout=60))
        await stack.wait_load(node, active=1, cancelled=0)
        second = asyncio.create_task(http.post("/completions", json=body, timeout=60))
        await stack.wait_for(node, lambda load: load.waiting == 1)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.completions.create(**body, extra_headers={"X-Prism-Node": node})
        assert_openai_error(caught.value, 429, "overloaded", "rate_limit_error")
        assert caught.value.response.headers["retry-after"] == "1"
        for task in (first, second):  # the clients leave before a first token: both are cancelled
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
    load = await stack.wait_for(node, lambda load: load.cancelled == 2, timeout_s=3)
    assert load.waiting == 0  # the queued one at once; the running one when its step ends (its expert's deadline)
    await stack.wait_load(node, active=0, cancelled=2, timeout_s=15)


async def test_a_gating_silent_past_the_timeout_is_504_and_the_request_is_cancelled(stack: ApiStack) -> None:
    node = stack.cluster.node("slow")
    before = (await stack.wait_for(node, lambda load: load.active == 0)).cancelled
    impatient = await stack.add_api(node=node, request_timeout_s=0.5)
    async with AsyncOpenAI(base_url=stack.url(impatient), api_key="unused", max_retries=0) as c:
        with pytest.raises(openai.APIStatusError) as caught:
            await c.completions.create(model="demo", prompt="x", max_tokens=2)
    assert_openai_error(caught.value, 504, "timeout", "server_error")
    await stack.wait_load(node, active=0, cancelled=before + 1)


async def test_a_stopping_gating_is_503_shutting_down(stack: ApiStack, client: AsyncOpenAI, far_model: Path) -> None:
    gating = await stack.add_gating_node("stopping", far_model, expert_timeout_s=30, drain_timeout_s=0.2)
    node = stack.cluster.node("stopping")
    request = asyncio.create_task(client.completions.create(
        model="demo", prompt="x", max_tokens=2, extra_headers={"X-Prism-Node": node}))
    await stack.wait_load(node, active=1, cancelled=0)
    await gating.stop()
    with pytest.raises(openai.InternalServerError) as caught:
        await request
    assert_openai_error(caught.value, 503, "shutting_down", "server_error")


async def test_a_key_is_required_off_loopback(stack: ApiStack) -> None:
    key = "k" * 24
    server = await stack.add_api(host="0.0.0.0", key=key, node=stack.cluster.node("ok"))
    url = stack.url(server)
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/models")).status_code == 401
    for wrong in ("x" * 24, key + "x"):
        async with AsyncOpenAI(base_url=url, api_key=wrong, max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError) as caught:
                await c.models.list()
            assert_openai_error(caught.value, 401, "invalid_api_key", "authentication_error")
    async with AsyncOpenAI(base_url=url, api_key=key, max_retries=0) as c:
        assert [m.id for m in (await c.models.list()).data] == ["demo"]
        reply = await c.completions.create(model="demo", prompt="x", max_tokens=1, temperature=0)
        assert reply.choices[0].finish_reason == "length"


async def test_the_cancel_subject_answers_bad_input_with_a_code(stack: ApiStack) -> None:
    import json

    import nats as nats_client

    from shared import subjects
    from shared.errors import error_from_headers

    nc = await nats_client.connect(stack.hub.cfg.client_url())
    try:
        subject = subjects.cancel(stack.cluster.node("ok"))
        for payload, code in ((b"nope", "invalid_json"), (b'{"reply_to": 5}', "invalid_request"),
                              (b'{"reply_to": "x", "more": 1}', "invalid_request")):
            reply = await nc.request(subject, payload, timeout=5)
            error = error_from_headers(dict(reply.headers or {}))
            assert error is not None
            assert error.code == code
        reply = await nc.request(subject, b'{"reply_to": "_INBOX.nobody"}', timeout=5)
        assert json.loads(reply.data) == {"cancelled": 0}
    finally:
        await nc.close()


async def test_health_is_200_while_the_node_answers_and_503_when_none_does(stack: ApiStack, api: HttpServer) -> None:
    """`GET /health` needs no key: a load balancer asks it. The configured node must be among the gatings
    whose loads the API read last; an API configured for a node that does not exist is unavailable."""
    nowhere = await stack.add_api(node="nowhere", key="a key of sixteen+ chars")  # no key needed for health
    anywhere = await stack.add_api()
    async with httpx.AsyncClient() as http:
        for server, status in ((api, 200), (anywhere, 200), (nowhere, 503)):
            reply = await http.get(f"http://127.0.0.1:{server.port}/health")
            assert reply.status_code == status, reply.text
            assert reply.json()["status"] == ("ok" if status == 200 else "unavailable")
        assert "nowhere" in (await http.get(f"http://127.0.0.1:{nowhere.port}/health")).json()["reason"]
