"""Cancellation on the real engine: a Cancel reaches the worker through Redis, vLLM lets go of
the request within a second, and the client's stream ends with finish_reason "abort"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from shared import redis as sredis
from shared.messages import DoneEvent, GenerationRequest, SamplingOptions, TokensEvent
from shared.settings import Settings
from tests.conftest import Services, make_settings
from tests.test_worker_queue import listen
from tests.test_worker_traffic import produce
from workers.engines.vllm import VllmEngine
from workers.main import serve


@pytest.fixture(scope="module")
async def vllm_worker(
    services: Services, model_ready: None
) -> AsyncIterator[tuple[Settings, VllmEngine]]:
    settings = make_settings(services, requests_partitions=1)
    engine = VllmEngine.start(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, engine, stop))
    try:
        yield settings, engine
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await engine.shutdown()


def long_request() -> GenerationRequest:
    return GenerationRequest(
        request_id=f"cancel-me-{time.time_ns()}",
        prompt="Tell me a very long story about a lighthouse keeper.",
        sampling=SamplingOptions(max_tokens=512, temperature=0, ignore_eos=True),
        enqueued_at=time.time(),
    )


def unfinished_in_vllm(engine: VllmEngine) -> int:
    """Requests vLLM's front end still tracks (it drops them on finish or abort)."""
    return engine._llm.output_processor.get_num_unfinished_requests()


async def test_cancel_stops_a_long_stream_in_vllm_within_a_second(
    vllm_worker: tuple[Settings, VllmEngine],
) -> None:
    settings, engine = vllm_worker
    assert engine._llm.vllm_config.scheduler_config.policy == settings.scheduling_policy
    request = long_request()
    events = await listen(settings, [request.request_id])
    redis = Redis.from_url(settings.redis)
    await produce(settings, settings.requests_topic, request.model_dump_json().encode())
    tokens = 0
    done: DoneEvent | None = None
    cancelled_at = released_s = 0.0
    async for _, event in events:
        if isinstance(event, TokensEvent):
            tokens += len(event.tokens)
            if tokens >= 8 and not cancelled_at:  # well under way (512 tokens take ~30 s)
                assert engine.num_running() == 1 and unfinished_in_vllm(engine) == 1
                cancelled_at = time.monotonic()
                await sredis.cancel(redis, settings, request.request_id, "client_disconnected")
                while engine.num_running() or unfinished_in_vllm(engine):
                    assert time.monotonic() - cancelled_at < 1.0, "vLLM still holds it"
                    await asyncio.sleep(0.01)
                released_s = time.monotonic() - cancelled_at
        elif isinstance(event, DoneEvent):
            done = event
    await redis.aclose()
    assert done is not None and done.finish_reason == "abort"
    assert tokens <= done.usage.completion_tokens < 512
    print(f"vLLM released the request {released_s * 1000:.0f} ms after the cancel")

    # The engine keeps serving after the abort.
    after = long_request()
    after.sampling = SamplingOptions(max_tokens=4, temperature=0, ignore_eos=True)
    events = await listen(settings, [after.request_id])
    await produce(settings, settings.requests_topic, after.model_dump_json().encode())
    finished = [e async for _, e in events if isinstance(e, DoneEvent)]
    assert finished[0].finish_reason == "length" and finished[0].usage.completion_tokens == 4
