"""The official `openai` client against the API on a real stack (demo model): greedy text equals the
model run in one process, text and token-id prompts, chat through the checkpoint's template, streaming
with usage, stop strings, and a client that leaves mid-stream freeing its sequence on the gating."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from services.api.server import HttpServer
from shared.model.tokenizer import Tokenizer
from tests.api.conftest import DEMO, ApiStack
from tests.serving.conftest import reference

PROMPT = "def fib(n):"
N = 16


@pytest.fixture(scope="module")
async def api(stack: ApiStack) -> HttpServer:
    """An API whose configured node is `ok` (no header needed)."""
    return await stack.add_api(node=stack.cluster.node("ok"))


@pytest.fixture(scope="module")
async def client(stack: ApiStack, api: HttpServer) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=stack.url(api), api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(DEMO)


def expected(tokenizer: Tokenizer, ids: list[int], n: int = N) -> str:
    """Greedy text of the model in one process."""
    return tokenizer.decode(reference(Path(DEMO), [ids], n)[0])


async def test_models_lists_the_demo_model(client: AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert models.data[0].owned_by == "prism"


async def test_greedy_completion_equals_the_model_in_one_process(client: AsyncOpenAI, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    text = expected(tokenizer, ids)
    reply = await client.completions.create(model="demo", prompt=PROMPT, max_tokens=N, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        len(ids), N, len(ids) + N)
    by_ids = await client.completions.create(model="demo", prompt=ids, max_tokens=N, temperature=0)
    assert by_ids.choices[0].text == text  # a token-id prompt is the same request


async def test_streamed_completion_joins_to_the_same_text_and_ends_with_usage(
    client: AsyncOpenAI, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode(PROMPT)
    text = expected(tokenizer, ids)
    stream = await client.completions.create(model="demo", prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                             stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(ids), N)
    assert all(c.usage is None for c in chunks[:-1])


async def test_chat_renders_the_checkpoints_template_as_transformers_does(
    client: AsyncOpenAI, tokenizer: Tokenizer
) -> None:
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "You write C."}, {"role": "user", "content": "int main(void) {"}]
    rendered = AutoTokenizer.from_pretrained(DEMO).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(rendered)
    text = expected(tokenizer, ids)
    reply = await client.chat.completions.create(model="demo", messages=messages, max_tokens=N,  # type: ignore[arg-type]
                                                 temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(ids)
    stream = await client.chat.completions.create(model="demo", messages=messages, max_tokens=N,  # type: ignore[arg-type]
                                                  temperature=0, stream=True)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_a_stop_string_cuts_the_text_and_finishes_with_stop(client: AsyncOpenAI, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    text = expected(tokenizer, ids)
    stop = text[8:11]  # from the middle of the greedy answer
    assert len(stop) == 3
    cut = text[: text.index(stop)]
    reply = await client.completions.create(model="demo", prompt=PROMPT, max_tokens=N, temperature=0, stop=[stop])
    assert reply.choices[0].text == cut
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens < N  # the rest was cancelled, not generated and dropped
    stream = await client.completions.create(model="demo", prompt=PROMPT, max_tokens=N, temperature=0, stop=stop,
                                             stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_seeded_sampling_repeats(client: AsyncOpenAI) -> None:
    runs = [await client.completions.create(model="demo", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7)
            for _ in range(2)]
    assert runs[0].choices[0].text == runs[1].choices[0].text


async def test_a_client_leaving_mid_stream_frees_its_sequence(stack: ApiStack, client: AsyncOpenAI) -> None:
    node = stack.cluster.node("ok")
    before = await stack.wait_load(node, active=0, cancelled=(await stack.load(node)).cancelled)
    stream = await client.completions.create(model="demo", prompt=PROMPT, max_tokens=240, temperature=0, stream=True)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    # greedy runs 240 tokens without an end-of-sequence here: only a cancel ends it this early
    after = await stack.wait_load(node, active=0, cancelled=before.cancelled + 1, timeout_s=5)
    assert after.waiting == 0
