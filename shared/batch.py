"""`sluice batch`: put a JSONL file of requests on the batch topic, and collect their results.

Batch requests go straight to Kafka, not through the API: workers take them only when they have
spare capacity and write one `BatchResult` per request to the results topic (docs/BATCH.md).
Each input line is an object with an optional `correlation` (echoed in its result), `prompt` or
`messages`, and OpenAI's sampling fields.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import RecordMetadata
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from shared import batch_auth, kafka
from shared.messages import BatchResult, GenerationRequest, SamplingOptions, StrictChatMessage
from shared.settings import Settings

SEND_CHUNK = 500  # sends in flight at once: the producer batches them


class BatchLine(BaseModel):
    """One line of a batch file: OpenAI's completion/chat fields that Sluice supports."""

    model_config = ConfigDict(extra="forbid")

    correlation: str | None = Field(None, max_length=256)
    prompt: str | None = None
    messages: list[StrictChatMessage] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None


def to_request(line: BatchLine, settings: Settings, tenant: str | None = None) -> GenerationRequest:
    max_tokens = line.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise ValueError(f"max_tokens: at most {settings.max_tokens_limit}")
    stop = [line.stop] if isinstance(line.stop, str) else line.stop or []
    sampling = SamplingOptions(
        max_tokens=max_tokens, temperature=line.temperature, top_p=line.top_p, stop=stop,
        seed=line.seed,
    )  # fmt: skip
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt=line.prompt,
        messages=line.messages,
        sampling=sampling,
        enqueued_at=time.time(),
        tenant=tenant,
        correlation=line.correlation,
    )


def read_requests(
    path: Path, settings: Settings, tenant: str | None = None
) -> list[GenerationRequest]:
    """Every line as a request; a bad line raises ValueError naming it, before anything is
    sent (a half-submitted file is harder to fix than a rejected one)."""
    requests = []
    for n, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            requests.append(to_request(BatchLine.model_validate_json(text), settings, tenant))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "line"
            raise ValueError(f"{path}:{n}: {where}: {first['msg']}") from e
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from e
    return requests


async def submit(
    settings: Settings, requests: list[GenerationRequest], api_key: str | None = None
) -> None:
    """Produce the requests to the batch topic, keyed by request id, signed with `api_key`
    when given (shared/batch_auth.py)."""
    await kafka.ensure_topics(settings)
    signer = (batch_auth.key_id(api_key), batch_auth.secret_for(api_key)) if api_key else None
    producer = kafka.make_producer(settings)
    await producer.start()
    try:
        with tqdm(total=len(requests), desc="submitting", unit="req") as bar:
            for i in range(0, len(requests), SEND_CHUNK):
                sent = [
                    await send(producer, settings.batch_requests_topic, r, signer)
                    for r in requests[i : i + SEND_CHUNK]
                ]
                for future in sent:
                    await future
                    bar.update()
    finally:
        await producer.stop()


async def send(
    producer: AIOKafkaProducer,
    topic: str,
    request: GenerationRequest,
    signer: tuple[str, str] | None,
) -> asyncio.Future[RecordMetadata]:
    """Produce one batch request keyed by its id, signed by `signer` (key id, signing secret)
    when given; the future completes once the broker has it. `sluice batch` and the Batch API
    both send this way."""
    value = request.model_dump_json().encode()
    headers = batch_auth.signed_by(*signer, value) if signer else None
    return await producer.send(topic, value=value, key=request.request_id.encode(), headers=headers)


async def collect(
    settings: Settings, ids: Iterable[str] | None, timeout_s: float, tenant: str | None = None
) -> dict[str, BatchResult]:
    """Results from the start of the tenant's results topic (a consumer of its own, nothing
    committed): those of `ids` until all are in or `timeout_s` passed, or without ids everything
    there is now. A redelivered request may have two results; the first is kept."""
    wanted = set(ids) if ids is not None else None
    await kafka.ensure_topic(
        settings, batch_auth.results_topic(settings, tenant), settings.requests_partitions
    )
    consumer = AIOKafkaConsumer(
        batch_auth.results_topic(settings, tenant),
        **kafka.connection(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
    )
    await consumer.start()
    results: dict[str, BatchResult] = {}
    deadline = time.monotonic() + timeout_s
    try:
        with tqdm(total=len(wanted) if wanted else None, desc="results", unit="req") as bar:
            while time.monotonic() < deadline:
                got = await consumer.getmany(timeout_ms=500)
                for record in (r for records in got.values() for r in records):
                    result = _parse(record.value)
                    if result is None or result.request_id in results:
                        continue
                    if wanted is None or result.request_id in wanted:
                        results[result.request_id] = result
                        bar.update()
                if wanted is not None and len(results) == len(wanted):
                    break
                if wanted is None and not got and await _caught_up(consumer):
                    break
    finally:
        await consumer.stop()
    return results


def _parse(value: bytes | None) -> BatchResult | None:
    try:
        return BatchResult.model_validate_json(value or b"")
    except ValidationError:
        return None  # not ours to judge: another writer's message


async def _caught_up(consumer: AIOKafkaConsumer) -> bool:
    """Read up to each partition's end. Highwater marks, not end_offsets(): the dev broker's
    ListOffsets is wrong after multi-record batches."""
    partitions = consumer.assignment()
    if not partitions:
        return False
    for tp in partitions:
        highwater = consumer.highwater(tp)
        if highwater is None or await consumer.position(tp) < highwater:
            return False
    return True


def write_results(
    results: dict[str, BatchResult], order: list[str] | None, out: Path | None
) -> None:
    """JSON lines, in submission order when known; to stdout without `out`."""
    ordered = [results[r] for r in order if r in results] if order else list(results.values())
    lines = "".join(r.model_dump_json() + "\n" for r in ordered)
    if out is None:
        print(lines, end="")
    else:
        out.write_text(lines)
