"""Whole documents fit on the ingest topic: messages well over aiokafka's 1 MiB default go
through the real broker."""

from __future__ import annotations

import time

from shared import kafka
from shared.messages import IngestDocument
from tests.conftest import Services, make_settings


async def test_a_document_of_several_mib_round_trips(services: Services) -> None:
    settings = make_settings(services)
    await kafka.ensure_topics(settings)
    text = "word " * (settings.max_document_bytes // 5)  # the largest document accepted
    doc = IngestDocument(doc_id="big", text=text, enqueued_at=time.time())
    value = doc.model_dump_json().encode()
    assert len(value) > 5 * 2**20

    producer = kafka.make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(settings.ingest_topic, value=value, key=b"big")
    finally:
        await producer.stop()
    consumer = kafka.make_consumer(settings, settings.ingest_topic, group="test-large")
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        records = []
        while not records and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            records = [r for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    assert [IngestDocument.model_validate_json(r.value).text for r in records] == [text]
