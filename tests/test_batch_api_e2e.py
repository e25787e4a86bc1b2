"""OpenAI's Batch API on the real stack, with the official openai client: files, batches over
the batch topics, the collector assembling outputs, cancellation and expiry."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types import Batch
from redis import Redis

from shared.devstack import LocalStack
from tests.conftest import Services, make_settings

pytestmark = pytest.mark.stack


@pytest.fixture
def client(stack: LocalStack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=300
    ) as c:
        yield c


def chat_line(model: str, i: int, max_tokens: int = 4) -> dict:
    body = {
        "model": model, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": f"Say the number {i}."}],
    }  # fmt: skip
    return {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def upload(client: openai.OpenAI, path: Path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with path.open("rb") as f:
        return client.files.create(file=f, purpose="batch").id


def start_batch(client: openai.OpenAI, path: Path, lines: list[dict]) -> Batch:
    return client.batches.create(
        input_file_id=upload(client, path, lines), endpoint="/v1/chat/completions",
        completion_window="24h",
    )  # fmt: skip


def wait(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses or time.monotonic() > deadline:
            return batch
        time.sleep(1)


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    assert file_id is not None
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_a_batch_of_200_lines_two_invalid_completes_through_the_openai_client(
    client: openai.OpenAI, stack: LocalStack, tmp_path: Path
) -> None:
    model = stack.settings.model
    lines = [chat_line(model, i) for i in range(200)]
    lines[57]["body"]["max_tokens"] = 100_000  # over SLUICE_MAX_TOKENS_LIMIT
    lines[120]["custom_id"] = "q3"  # custom_ids must be unique
    lines[5]["body"].update(logprobs=True, top_logprobs=2)
    file_id = upload(client, tmp_path / "jobs.jsonl", lines)
    assert client.files.retrieve(file_id).filename == "jobs.jsonl"
    assert file_id in {f.id for f in client.files.list(purpose="batch").data}

    create = dict(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"run": "test"}, extra_headers={"Idempotency-Key": f"jobs-{file_id}"},
    )  # fmt: skip
    batch = client.batches.create(**create)  # type: ignore[arg-type]
    assert batch.status in ("in_progress", "finalizing", "completed") and batch.metadata == {
        "run": "test"
    }
    # A retry of the create (a timeout on the client's side, say) is the same batch, not a
    # second run of its 200 lines.
    assert client.batches.create(**create).id == batch.id  # type: ignore[arg-type]
    batch = wait(client, batch.id, {"completed", "failed", "expired", "cancelled"})
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (200, 198, 2)
    assert batch.completed_at and batch.in_progress_at and batch.finalizing_at

    output = jsonl(client, batch.output_file_id)
    expected = sorted(f"q{i}" for i in range(200) if i not in (57, 120))
    assert sorted(o["custom_id"] for o in output) == expected
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in output)
    too_long, duplicate = jsonl(client, batch.error_file_id)  # in input order
    assert too_long["custom_id"] == "q57" and "max_tokens" in too_long["error"]["message"]
    assert duplicate["custom_id"] == "q3" and "earlier line" in duplicate["error"]["message"]
    # Each answer is what the online endpoint answers to the same body (greedy).
    online = client.chat.completions.create(**lines[3]["body"])
    [third] = [o for o in output if o["custom_id"] == "q3"]
    body = third["response"]["body"]
    assert body["choices"][0]["message"]["content"] == online.choices[0].message.content
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] > 0
    # A line asking for logprobs gets them, as the online endpoint gives them.
    online = client.chat.completions.create(**lines[5]["body"])
    [fifth] = [o["response"]["body"]["choices"][0] for o in output if o["custom_id"] == "q5"]
    assert online.choices[0].logprobs is not None and online.choices[0].logprobs.content
    assert [t["token"] for t in fifth["logprobs"]["content"]] == [
        t.token for t in online.choices[0].logprobs.content
    ]
    assert len(fifth["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert batch.id in {b.id for b in client.batches.list(limit=100).data}


def test_an_embeddings_batch_answers_what_the_online_endpoint_answers(
    client: openai.OpenAI, stack: LocalStack, tmp_path: Path
) -> None:
    model = stack.settings.embedding_model
    texts = [f"A sentence about tide number {i}." for i in range(30)]
    lines = [
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": model, "input": [text], "encoding_format": "float"}}
        for i, text in enumerate(texts)
    ]  # fmt: skip
    lines[7]["body"]["dimensions"] = 7  # the model makes 384: this line is refused
    batch = client.batches.create(
        input_file_id=upload(client, tmp_path / "embed.jsonl", lines), endpoint="/v1/embeddings",
        completion_window="24h",
    )  # fmt: skip
    batch = wait(client, batch.id, {"completed", "failed", "expired", "cancelled"}, 300)
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (30, 29, 1)
    [refused] = jsonl(client, batch.error_file_id)
    assert refused["custom_id"] == "e7" and "dimensions" in refused["error"]["message"]
    output = {o["custom_id"]: o["response"]["body"] for o in jsonl(client, batch.output_file_id)}
    assert sorted(output) == sorted(f"e{i}" for i in range(30) if i != 7)
    online = client.embeddings.create(model=model, input=texts[3], encoding_format="float")
    vector = output["e3"]["data"][0]["embedding"]
    assert len(vector) == 384 and output["e3"]["usage"]["prompt_tokens"] > 0
    assert max(abs(a - b) for a, b in zip(vector, online.data[0].embedding, strict=True)) < 1e-4


def test_a_cancelled_batch_stops_its_queued_lines(
    client: openai.OpenAI, stack: LocalStack, tmp_path: Path
) -> None:
    lines = [chat_line(stack.settings.model, i, max_tokens=32) for i in range(40)]
    batch = start_batch(client, tmp_path / "long.jsonl", lines)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = wait(client, batch.id, {"cancelled", "completed"}, timeout_s=300)
    assert batch.status == "cancelled" and batch.cancelled_at
    counts = batch.request_counts
    assert counts is not None and counts.total == 40 and counts.failed > 0
    errors = jsonl(client, batch.error_file_id)
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert counts.completed + len(errors) == 40
    assert client.batches.cancel(batch.id).status == "cancelled"  # again: nothing changes


def test_a_batch_past_its_window_expires_with_what_is_done(
    client: openai.OpenAI, stack: LocalStack, tmp_path: Path
) -> None:
    lines = [chat_line(stack.settings.model, i, max_tokens=48) for i in range(40)]
    batch = start_batch(client, tmp_path / "slow.jsonl", lines)
    redis = Redis.from_url(stack.settings.redis)
    redis.zadd(f"{stack.settings.redis_prefix}:batches-open", {batch.id: 0})  # its window is over
    redis.close()
    batch = wait(client, batch.id, {"expired", "completed"}, timeout_s=120)
    assert batch.status == "expired" and batch.expired_at
    counts = batch.request_counts
    assert counts is not None and counts.total == 40 and counts.failed > 0
    assert {e["error"]["code"] for e in jsonl(client, batch.error_file_id)} <= {"batch_expired"}


def test_unknown_files_and_batches_are_404s_and_bad_batches_400s(
    client: openai.OpenAI, tmp_path: Path
) -> None:
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-doesnotexist", endpoint="/v1/chat/completions",
            completion_window="24h",
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(
            input_file_id="file-x", endpoint="/v1/responses",  # type: ignore[arg-type]
            completion_window="24h",
        )  # fmt: skip
    assert err.value.param == "endpoint"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with empty.open("rb") as f:
        file_id = client.files.create(file=f, purpose="batch").id
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert err.value.param == "input_file_id"
    assert client.files.delete(file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(file_id)


async def test_a_line_redelivered_is_answered_once(services: Services, tmp_path: Path) -> None:
    """A worker that dies after producing a result, before its commit, runs the line again
    and produces a second result; the collector may read one twice too. Each line is in the
    output once, and the batch is finalized once, by the last line."""
    from redis.asyncio import Redis as AsyncRedis

    from api.batches import Batches, Static
    from api.files import DirectoryStore, Files
    from shared.messages import BatchResult, Usage

    settings = make_settings(services)
    redis = AsyncRedis.from_url(settings.redis)
    files = Files(settings, redis, DirectoryStore(tmp_path))
    batches = Batches(settings, redis, None, files, None, None)  # type: ignore[arg-type]
    static = Static(
        id="batch_redelivered", tenant="t", endpoint="/v1/completions", model="m",
        input_file_id="file-x", created_at=0, expires_at=2**31, total=2,
    )  # fmt: skip
    await redis.hset(batches.key(static.id), mapping={
        "static": static.model_dump_json(), "status": "in_progress", "completed": 0, "failed": 0,
    })  # fmt: skip

    def result(line: int, text: str) -> BatchResult:
        return BatchResult(
            request_id=f"{static.id}-{line}", correlation=f"c{line}", text=text,
            finish_reason="stop", usage=Usage(prompt_tokens=1, completion_tokens=1),
            finished_at=time.time(),
        )  # fmt: skip

    try:
        await batches.record_result(result(0, "first"))
        await batches.record_result(result(0, "second"))  # the same line again
        batch = await batches.get(static.id, "t")
        assert batch.status == "in_progress" and batch.request_counts.completed == 1
        await batches.record_result(result(1, "other"))
        await batches.record_result(result(1, "again, after the end"))
        batch = await batches.get(static.id, "t")
        assert batch.status == "completed" and batch.request_counts.completed == 2
        assert batch.output_file_id is not None
        output = (await files.content(batch.output_file_id, "t")).decode().splitlines()
        texts = [json.loads(o)["response"]["body"]["choices"][0]["text"] for o in output]
        assert texts == ["first", "other"]
    finally:
        await redis.aclose()
