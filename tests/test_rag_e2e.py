"""RAG over HTTP with every part real: API -> Kafka -> ingestion -> embeddings -> Milvus Lite
server, then /retrieve and /rag-generate through the worker and vLLM."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from httpx_sse import aconnect_sse

from shared.devstack import LocalStack

pytestmark = pytest.mark.stack

DOCS = {
    "lighthouse": (
        "The Skerry Point lighthouse was built in 1874 by the engineer Agnes Morrow. "
        "Its lamp burned whale oil until 1911, when it was converted to acetylene."
    ),
    "bakery": (
        "Hollis Bakery opens at six in the morning and is known for its rye sourdough, "
        "which is fermented for thirty hours before baking."
    ),
}


@pytest.fixture(scope="module")
async def client(stack: LocalStack):
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as c:
        yield c


async def wait_status(client: httpx.AsyncClient, doc_id: str, want: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = await client.get(f"/documents/{doc_id}")
        if r.status_code == 200 and r.json()["status"] == want:
            return r.json()
        if r.status_code == 200 and r.json()["status"] == "failed" and want != "failed":
            raise AssertionError(r.json())
        await asyncio.sleep(0.2)
    raise AssertionError(f"{doc_id} not {want} after 120 s: {r.text}")


@pytest.fixture(scope="module")
async def indexed(client: httpx.AsyncClient) -> None:
    for doc_id, text in DOCS.items():
        body = {
            "doc_id": f"e2e/{doc_id}",
            "text": text,
            "title": doc_id.title(),
            "source": f"{doc_id}.txt",
            "metadata": {"topic": doc_id},
        }
        r = await client.post("/documents", json=body)
        assert r.status_code == 202, r.text
        assert r.json() == {"doc_id": f"e2e/{doc_id}", "status": "queued"}
    for doc_id in DOCS:
        status = await wait_status(client, f"e2e/{doc_id}", "indexed")
        assert status["chunks"] >= 1


async def test_retrieve_ranks_the_right_document_and_filters(
    client: httpx.AsyncClient, indexed: None
) -> None:
    r = await client.post("/retrieve", json={"query": "Who built the lighthouse?", "top_k": 2})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results[0]["doc_id"] == "e2e/lighthouse"
    assert results[0]["n"] == 1 and "Agnes Morrow" in results[0]["snippet"]
    for mode in ("dense", "bm25"):
        r = await client.post("/retrieve", json={"query": "rye sourdough", "mode": mode})
        assert r.json()["results"][0]["doc_id"] == "e2e/bakery", mode
    only = {"query": "Who built the lighthouse?", "filters": {"topic": "bakery"}}
    r = await client.post("/retrieve", json=only)
    assert {x["doc_id"] for x in r.json()["results"]} == {"e2e/bakery"}


async def test_rag_generate_streams_sources_then_tokens(
    client: httpx.AsyncClient, indexed: None
) -> None:
    body = {"query": "When was the lamp converted to acetylene?", "top_k": 1,
            "max_tokens": 24, "temperature": 0, "stream": True}  # fmt: skip
    events: list[tuple[str, dict]] = []
    async with aconnect_sse(client, "POST", "/rag-generate", json=body) as src:
        assert src.response.status_code == 200
        async for sse in src.aiter_sse():
            events.append((sse.event, json.loads(sse.data)))
    kinds = [k for k, _ in events]
    assert kinds[0] == "sources" and kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"token"}
    sources = events[0][1]["sources"]
    assert [s["doc_id"] for s in sources] == ["e2e/lighthouse"]
    assert sources[0]["source"] == "lighthouse.txt" and sources[0]["chunk_id"] == "e2e/lighthouse#0"
    text = "".join(d["text"] for k, d in events if k == "token")
    assert text.strip()

    r = await client.post("/rag-generate", json={**body, "stream": False})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["text"] == text  # greedy: the same answer either way
    assert [s["doc_id"] for s in answer["sources"]] == ["e2e/lighthouse"]
    # The passage went into the prompt: far more prompt tokens than the question alone.
    assert answer["usage"]["prompt_tokens"] > 60

    # Under an Idempotency-Key a retry gets the first answer and its sources, not a new run.
    keyed = {"Idempotency-Key": "rag-lamp", "content-type": "application/json"}
    once = await client.post("/rag-generate", json={**body, "stream": False}, headers=keyed)
    again = await client.post("/rag-generate", json={**body, "stream": False}, headers=keyed)
    assert once.status_code == again.status_code == 200, again.text
    assert again.json()["request_id"] == once.json()["request_id"] != answer["request_id"]
    assert again.json()["sources"] == once.json()["sources"] == answer["sources"]


async def test_upload_resend_and_delete(client: httpx.AsyncClient, indexed: None) -> None:
    md = b"# Tide tables\n\nHigh tide at Skerry Point is at 04:12 on the first of May.\n"
    files = {"file": ("tides.md", md, "text/markdown")}
    data = {"doc_id": "e2e/tides", "metadata": json.dumps({"topic": "tides"})}
    r = await client.post("/documents", files=files, data=data)
    assert r.status_code == 202, r.text
    status = await wait_status(client, "e2e/tides", "indexed")
    assert status["source"] == "tides.md"
    r = await client.post("/retrieve", json={"query": "high tide time", "top_k": 1})
    assert r.json()["results"][0]["title"] == "Tide tables"

    r = await client.post("/documents", files=files, data=data)  # unchanged: indexed again
    assert r.status_code == 202
    await wait_status(client, "e2e/tides", "indexed")

    r = await client.delete("/documents/e2e/tides")
    assert r.status_code == 202
    await wait_status(client, "e2e/tides", "deleted")
    r = await client.post(
        "/retrieve", json={"query": "high tide time", "filters": {"topic": "tides"}}
    )
    assert r.json()["results"] == []


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/documents", {"text": "   "}, "text"),
        ("/documents", {"text": "x", "doc_id": "bad id!"}, "doc_id"),
        ("/documents", {"text": "x", "colour": "red"}, "colour"),
        ("/retrieve", {"query": " "}, "query"),
        ("/retrieve", {"query": "x", "top_k": 0}, "top_k"),
        ("/retrieve", {"query": "x", "filters": {"bad key": "v"}}, "filters"),
        # Bounded: each value is a term of the store's filter expression.
        (
            "/retrieve",
            {"query": "x", "filters": {"topic": [str(i) for i in range(101)]}},
            "filters",
        ),
        ("/retrieve", {"query": "x", "filters": {f"k{i}": 1 for i in range(17)}}, "filters"),
        ("/rag-generate", {"query": "x", "filters": {"topic": "t" * 257}}, "filters"),
        ("/rag-generate", {"query": "x", "temperature": 5}, "temperature"),
    ],
)
async def test_bad_input_is_a_422_naming_the_field(
    client: httpx.AsyncClient, path: str, body: dict, field: str
) -> None:
    r = await client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert any(field in map(str, e["loc"]) for e in r.json()["detail"]), r.text


async def test_unsupported_upload_and_unknown_document(client: httpx.AsyncClient) -> None:
    files = {"file": ("report.docx", b"PK...", "application/octet-stream")}
    r = await client.post("/documents", files=files)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "file"]
    assert "docx" in r.json()["detail"][0]["msg"]
    assert (await client.get("/documents/no-such-doc")).status_code == 404


def test_passages_are_dropped_to_fit_the_context_with_few_prompt_tokenizations(
    model_ready: None,
) -> None:
    """The prompt was tokenized again for every dropped passage (50 passages over: 50 whole
    prompts on the event loop). Now each passage is tokenized once, the whole prompt only to
    confirm, and the result is still the longest prefix of the ranking that fits."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from api.rag import PromptTemplate, RagHandler
    from api.schemas import GenerateBody, RagGenerateBody
    from shared.models import model_path
    from shared.prompts import prompt_token_ids
    from shared.retrieval import Retrieved
    from shared.settings import Settings
    from shared.vectorstores.base import Chunk

    settings = Settings(max_model_len=1024)
    tokenizer = AutoTokenizer.from_pretrained(model_path(settings))
    calls = {"prompts": 0}

    class Counting:  # the tokenizer, counting whole-prompt tokenizations (chat templates)
        def __getattr__(self, name: str) -> object:
            return getattr(tokenizer, name)

        def apply_chat_template(self, *args: object, **kwargs: object) -> object:
            calls["prompts"] += 1
            return tokenizer.apply_chat_template(*args, **kwargs)

    template = PromptTemplate.load(settings.rag_prompt_template)
    handler = RagHandler(settings, SimpleNamespace(tokenizer=Counting()), None, template)  # type: ignore[arg-type]
    passages = [
        Retrieved(Chunk(f"d{i}#0", f"d{i}", 0, f"Passage {i}: " + "tide and wind " * 30,
                        f"s{i}", f"T{i}", "h"), 1.0 - i / 100)
        for i in range(50)
    ]  # fmt: skip
    body = RagGenerateBody(query="When is high tide?", max_tokens=64)
    kept = handler._fit(body, passages)

    def fits(ps: list[Retrieved]) -> bool:
        prompt = GenerateBody(messages=template.messages(body.query, ps))
        return len(prompt_token_ids(tokenizer, prompt)) <= 1024 - 64

    assert 0 < len(kept) < len(passages) and kept == passages[: len(kept)]
    assert fits(kept) and not fits(passages[: len(kept) + 1])
    assert calls["prompts"] <= 3
