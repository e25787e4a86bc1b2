"""The OpenAI-compatible API (/v1) through the whole path, with the official openai client and
LangChain's ChatOpenAI: API -> Kafka -> vLLM worker -> Redis -> JSON or SSE chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI

from shared.devstack import LocalStack
from tests.conftest import PROMPTS

pytestmark = pytest.mark.stack

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(stack: LocalStack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=300
    ) as c:
        yield c


@pytest.fixture
async def aclient(stack: LocalStack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=300
    ) as c:
        yield c


@pytest.fixture
def model(stack: LocalStack) -> str:
    return stack.settings.model


def test_chat_streamed_greedy_equals_non_streamed(client: openai.OpenAI, model: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=CHAT, max_tokens=16, temperature=0, user="tenant-a"
    )
    whole = raw.parse()
    assert whole.id.startswith("chatcmpl-") and whole.model == model
    [choice] = whole.choices
    text = choice.message.content
    assert choice.message.role == "assistant" and "Paris" in (text or "")
    assert choice.finish_reason in ("stop", "length")
    usage = whole.usage
    assert usage is not None and usage.prompt_tokens > 20 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The worker's cost: a header and a top-level extra field, never inside `usage`.
    assert 0 < float(raw.headers["x-sluice-cost-usd"]) < 0.01
    assert whole.model_extra and whole.model_extra["sluice_cost_usd"] > 0

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=CHAT,
            max_completion_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, finish, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content) == text
    assert all(c.usage is None for c in chunks[:-1])
    assert finish.choices[0].finish_reason == choice.finish_reason
    assert last.choices == [] and last.usage == usage


async def test_completions_async_match_vllm_and_stop_at_max_tokens(
    aclient: openai.AsyncOpenAI, model: str, greedy_reference: dict[str, str]
) -> None:
    prompt = PROMPTS[0]
    whole = await aclient.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0
    )
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion"
    [choice] = whole.choices
    # The reference is plain vLLM's greedy answer of 24 tokens; 12 are its beginning.
    assert choice.text and greedy_reference[prompt].startswith(choice.text)
    assert choice.finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12

    stream = await aclient.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_models_lists_the_served_model_and_its_workers(client: openai.OpenAI, model: str) -> None:
    [card] = client.models.list().data
    assert card.id == model and card.object == "model"
    workers = (card.model_extra or {})["sluice_workers"]
    assert workers and all(w["engine"] == "vllm" and w["worker_id"] for w in workers)


def test_langchain_chat_openai_invoke_and_stream(stack: LocalStack, model: str) -> None:
    llm = ChatOpenAI(
        base_url=f"{stack.url}/v1",
        api_key="unused",
        model=model,
        temperature=0,
        max_tokens=16,
        max_retries=0,
        stream_usage=True,
    )
    answer = llm.invoke("What is the capital of France?")
    assert isinstance(answer.content, str) and "Paris" in answer.content
    assert answer.response_metadata["finish_reason"] in ("stop", "length")

    merged: Any = None
    for chunk in llm.stream("What is the capital of France?"):
        assert isinstance(chunk, AIMessageChunk)
        merged = chunk if merged is None else merged + chunk
    assert merged.content == answer.content
    assert merged.usage_metadata is not None and answer.usage_metadata is not None
    assert merged.usage_metadata["total_tokens"] == answer.usage_metadata["total_tokens"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
        ({"logprobs": True}, "logprobs"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
        ({"n": 2, "stream": True}, "n"),
    ],
)
def test_bad_requests_are_openai_400s_naming_the_param(
    client: openai.OpenAI, model: str, kwargs: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{"model": model, "messages": CHAT, **kwargs})
    assert err.value.status_code == 400
    assert err.value.param == param and err.value.type == "invalid_request_error"
    assert param in err.value.message


def test_unknown_model_is_an_openai_404_and_generate_keeps_its_shape(
    client: openai.OpenAI, stack: LocalStack
) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=4)
    assert err.value.code == "model_not_found" and err.value.param == "model"
    assert "gpt-4o" in err.value.message
    # The /v1 error handlers leave the native API's 422 shape alone.
    r = httpx.post(f"{stack.url}/generate", json={"prompt": "hi", "n": 2}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "n"]
