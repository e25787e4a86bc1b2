"""The OpenAI-compatible API (/v1) through the whole path, with the official openai client and
LangChain's ChatOpenAI: API -> Kafka -> vLLM worker -> Redis -> JSON or SSE chunks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

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


def test_models_lists_the_served_model_and_its_workers(
    client: openai.OpenAI, model: str, stack: LocalStack
) -> None:
    cards = {c.id: c for c in client.models.list().data}
    assert set(cards) == {model, *stack.settings.models, stack.settings.embedding_model}
    card = cards[model]
    assert card.object == "model"
    workers = (card.model_extra or {})["sluice_workers"]
    assert workers and all(w["engine"] == "vllm" and w["worker_id"] for w in workers)
    embedding = cards[stack.settings.embedding_model].model_extra or {}
    assert embedding["sluice_served_by"] == "api" and embedding["sluice_workers"] == []


EMBED = ["High tide at the harbour is at six in the evening.", "The bakery opens at seven."]


@pytest.fixture(scope="module")
def reference_vectors(stack: LocalStack) -> tuple[list[list[float]], Any]:
    """What RAG's own embedder makes of EMBED, and its tokenizer."""
    from shared.embeddings import Embedder

    embedder = Embedder.load(stack.settings)
    return embedder.embed(EMBED), embedder.tokenizer


def test_embeddings_are_rag_embedders_vectors_as_floats_base64_and_from_token_ids(
    client: openai.OpenAI, stack: LocalStack, reference_vectors: tuple[list[list[float]], Any]
) -> None:
    reference, tokenizer = reference_vectors
    name = stack.settings.embedding_model
    base64_ = client.embeddings.create(model=name, input=EMBED)  # the client's default
    floats = client.embeddings.create(model=name, input=EMBED, encoding_format="float")
    for got in (base64_, floats):
        assert got.model == name and [d.index for d in got.data] == [0, 1]
        for d, ref in zip(got.data, reference, strict=True):
            assert len(d.embedding) == 384
            assert np.allclose(d.embedding, ref, atol=1e-5)
        assert got.usage.prompt_tokens == got.usage.total_tokens > 10
        assert (got.model_extra or {})["sluice_cost_usd"] > 0
    ids = tokenizer.encode(EMBED[0], add_special_tokens=False)
    one = client.embeddings.create(model=name, input=ids, encoding_format="float")
    assert one.usage.prompt_tokens == len(ids)
    assert np.allclose(one.data[0].embedding, reference[0], atol=1e-4)
    text = client.embeddings.create(model=name, input=EMBED[1], encoding_format="float")
    assert np.allclose(text.data[0].embedding, reference[1], atol=1e-5)


def test_langchain_openai_embeddings(
    stack: LocalStack, reference_vectors: tuple[list[list[float]], Any]
) -> None:
    from langchain_openai import OpenAIEmbeddings

    reference, _ = reference_vectors
    embeddings = OpenAIEmbeddings(
        model=stack.settings.embedding_model, base_url=f"{stack.url}/v1", api_key="unused",
        check_embedding_ctx_length=False, max_retries=0,
    )  # fmt: skip
    documents = embeddings.embed_documents(EMBED)
    assert np.allclose(documents, reference, atol=1e-5)
    assert np.allclose(embeddings.embed_query(EMBED[0]), reference[0], atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"dimensions": 100}, 400, "dimensions"),
        ({"input": []}, 400, "input"),
        ({"input": ""}, 400, "input"),
        ({"input": "tide " * 600}, 400, "input"),
        ({"input": [[1, 2, 10**7]]}, 400, "input"),
        ({"model": "text-embedding-3-small"}, 404, "model"),
    ],
)
def test_bad_embedding_requests_name_the_param(
    client: openai.OpenAI, stack: LocalStack, kwargs: dict, status: int, param: str
) -> None:
    body = {"model": stack.settings.embedding_model, "input": "tides", **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.embeddings.create(**body)
    assert err.value.status_code == status and err.value.param == param, err.value.message


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


class City(BaseModel):
    city: str
    country: str


def test_structured_output_parses_into_the_clients_pydantic_model(
    client: openai.OpenAI, model: str
) -> None:
    """`response_format` with a JSON schema, through the wire to vLLM's structured outputs:
    the openai client's own `parse` validates the answer against the model."""
    question = [{"role": "user", "content": "Name the capital of France and its country."}]
    completion = client.chat.completions.parse(
        model=model, messages=question, response_format=City, max_tokens=64, temperature=0
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.city and parsed.country
    # Any JSON object: the grammar keeps it JSON, the prompt has the small model close it.
    ask = [{"role": "user", "content": 'Give the capital of France as JSON: {"capital": ...}'}]
    loose = client.chat.completions.create(
        model=model, messages=ask, response_format={"type": "json_object"}, max_tokens=64,
        temperature=0,
    )  # fmt: skip
    assert loose.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(loose.choices[0].message.content or ""), dict)


def test_logprobs_in_chat_and_completions_streamed_or_not(
    client: openai.OpenAI, model: str
) -> None:
    ask = {"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and whole.usage is not None
    # Every token of the text; the EOS that ended it counts in usage but is not text.
    ended_by_eos = whole.choices[0].finish_reason == "stop"
    assert len(logprobs.content) == whole.usage.completion_tokens - ended_by_eos
    assert "".join(t.token for t in logprobs.content) == whole.choices[0].message.content
    for t in logprobs.content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert (t.token, t.logprob) == (t.top_logprobs[0].token, t.top_logprobs[0].logprob)
        assert bytes(t.bytes or []).decode() == t.token
    streamed = [
        token
        for chunk in client.chat.completions.create(**ask, logprobs=True, stream=True)
        for choice in chunk.choices
        for token in (choice.logprobs.content or [] if choice.logprobs else [])
    ]
    assert [t.token for t in streamed] == [t.token for t in logprobs.content]
    assert all(t.top_logprobs == [] for t in streamed)  # top_logprobs not asked: none

    completion = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    legacy = completion.choices[0].logprobs
    assert legacy is not None and legacy.tokens and legacy.top_logprobs and legacy.text_offset
    assert "".join(legacy.tokens) == completion.choices[0].text
    assert all(len(top) <= 2 for top in legacy.top_logprobs)
    assert legacy.text_offset == sorted(legacy.text_offset) and legacy.text_offset[0] == 0


def test_penalties_go_through_the_openai_client(client: openai.OpenAI, model: str) -> None:
    ask = {"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0}
    plain = client.chat.completions.create(**ask)
    penalized = client.chat.completions.create(
        **ask, frequency_penalty=1.5, presence_penalty=1.0,
        extra_body={"repetition_penalty": 1.3, "stop_token_ids": [0]},
    )  # fmt: skip
    assert penalized.choices[0].message.content
    assert plain.usage is not None and penalized.usage is not None
    assert penalized.usage.prompt_tokens == plain.usage.prompt_tokens


async def test_generate_takes_response_format_too(stack: LocalStack) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    body = {
        "prompt": "What is two plus two? Answer in JSON.", "max_tokens": 32, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    }  # fmt: skip
    async with httpx.AsyncClient(base_url=stack.url, timeout=120) as http:
        r = await http.post("/generate", json=body)
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["text"]), schema)
        # A JSON Schema the worker's grammar compiler cannot build: a clear error, not a hang.
        dangling = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}
        body["response_format"]["json_schema"]["schema"] = dangling
        failed = await http.post("/generate", json=body)
        assert failed.status_code == 400 and "Grammar error" in failed.json()["detail"], failed.text
        body["response_format"]["json_schema"]["schema"] = {"type": "nonsense"}
        bad = await http.post("/generate", json=body)
    assert bad.status_code == 422
    [error] = bad.json()["detail"]
    assert error["loc"] == ["body", "response_format", "json_schema", "schema"]
    assert "not a JSON Schema" in error["msg"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 5}, "n"),  # above SLUICE_MAX_N (4)
        ({"n": 0}, "n"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": 3}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
        ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
        ({"n": 5, "stream": True}, "n"),
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
    r = httpx.post(f"{stack.url}/generate", json={"prompt": "hi", "n": 2}, timeout=30)  # /v1 only
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "n"]


def test_n_choices_streamed_or_not(client: openai.OpenAI, model: str) -> None:
    one = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    greedy = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=8, temperature=0, n=2
    )
    assert [c.index for c in greedy.choices] == [0, 1]
    # Greedy choices are the same text, each the single request's; the prompt counts once.
    assert {c.message.content for c in greedy.choices} == {one.choices[0].message.content}
    assert one.usage is not None and greedy.usage is not None
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens
    assert greedy.usage.completion_tokens == 2 * one.usage.completion_tokens

    # Sampled with a seed: each choice its own seed (seed + index), so they differ.
    ask = dict(model=model, messages=CHAT, max_tokens=12, temperature=1.0, seed=11, n=3)
    sampled = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) > 1 and all(texts)
    chunks = list(
        client.chat.completions.create(  # type: ignore[call-overload]
            **ask, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed, finished = ["", "", ""], [None, None, None]
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            finished[choice.index] = choice.finish_reason or finished[choice.index]
    assert all(streamed) and all(finished)
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == one.usage.prompt_tokens

    completions = client.completions.create(
        model=model, prompt="The sky is", max_tokens=6, temperature=1.0, seed=3, n=2, logprobs=1
    )
    assert [c.index for c in completions.choices] == [0, 1]
    for choice in completions.choices:  # each choice's offsets count from its own start
        assert choice.logprobs is not None and choice.logprobs.text_offset[0] == 0
