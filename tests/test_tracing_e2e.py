"""Every hop of a request is traced: the timeline `sluice trace` prints, and OpenTelemetry
spans that reach a collector (tests/otlp_receiver.py) as one trace across API and worker,
joined by the `traceparent` the API puts in the Kafka message's headers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from shared import redis as sredis
from shared import tracing
from shared.devstack import LocalStack, settings_env
from tests.otlp_receiver import Receiver

pytestmark = pytest.mark.stack

PATH = tracing.FIRST_TOKEN_PATH


async def streamed_request(stack: LocalStack, headers: dict[str, str] | None = None) -> str:
    body = {"prompt": "Say something about rivers.", "max_tokens": 8, "temperature": 0}
    async with (
        httpx.AsyncClient(base_url=stack.url, timeout=120) as client,
        aconnect_sse(
            client, "POST", "/generate", json={**body, "stream": True}, headers=headers or {}
        ) as source,
    ):
        rid = source.response.headers["x-request-id"]
        events = [sse.event async for sse in source.aiter_sse()]
    assert events[-1] == "done" and events.count("token") == 8
    return rid


async def timeline(stack: LocalStack, rid: str) -> list[dict[str, Any]]:
    """The request's hops once both processes have written their last one."""
    redis = sredis.connect(stack.settings)
    try:
        for _ in range(50):
            hops = await tracing.timeline(redis, stack.settings, rid)
            names = {h["hop"] for h in hops}
            if {tracing.API_DONE, tracing.WORKER_DONE} <= names:
                return hops
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()
    raise AssertionError(f"incomplete trace of {rid}: {hops}")


async def test_every_hop_is_recorded_in_order_and_sluice_trace_prints_it(
    stack: LocalStack,
) -> None:
    rid = await streamed_request(stack)
    hops = await timeline(stack, rid)
    names = [h["hop"] for h in hops]
    at = {h["hop"]: h["t"] for h in hops}
    assert all(hop in at for hop in PATH), names
    # One clock per host: each hop is at or after the one before it on the path.
    times = [at[hop] for hop in PATH]
    assert times == sorted(times), list(zip(PATH, times, strict=True))
    assert at[tracing.WORKER_DONE] <= at[tracing.API_DONE]
    picked = next(h for h in hops if h["hop"] == tracing.WORKER_PICKED)
    produced = next(h for h in hops if h["hop"] == tracing.KAFKA_PRODUCED)
    assert (picked["partition"], picked["offset"]) == (produced["partition"], produced["offset"])
    assert picked["by"] != "sluice-api"  # the worker's id
    assert len({h["trace"] for h in hops if "trace" in h}) == 1  # API and worker: one trace

    env = {**os.environ, **settings_env(stack.settings)}
    out = await sluice(env, "trace", rid)
    assert out.returncode == 0
    assert f"request {rid}" in out.stdout and "<- longest gap" in out.stdout
    assert all(hop in out.stdout for hop in PATH)
    as_json = await sluice(env, "trace", rid, "--json")
    assert [h["hop"] for h in json.loads(as_json.stdout)] == names
    unknown = await sluice(env, "trace", "no-such-request")
    assert unknown.returncode == 1 and "no trace for no-such-request" in unknown.stdout


async def sluice(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cli", *args], capture_output=True, text=True,
        env=env, timeout=60, check=False,
    )  # fmt: skip


async def test_api_and_worker_spans_form_one_trace_at_the_collector(
    stack: LocalStack, otlp: Receiver
) -> None:
    """In the trace of the client that sent a `traceparent`, as a W3C client expects."""
    trace_id, client_span = os.urandom(16).hex(), os.urandom(8).hex()
    rid = await streamed_request(stack, {"traceparent": f"00-{trace_id}-{client_span}-01"})
    hops = await timeline(stack, rid)
    assert {h["trace"] for h in hops if "trace" in h} == {trace_id}
    spans: dict[str, Any] = {}
    for _ in range(150):  # the SDK exports in batches, every 5 s by default
        spans = {s.name: s for s in otlp.of_trace(trace_id)}
        if {"sluice.api.request", "sluice.worker.request", tracing.WORKER_DONE} <= set(spans):
            break
        await asyncio.sleep(0.1)
    api, worker = spans["sluice.api.request"], spans["sluice.worker.request"]
    assert (api.service, worker.service) == ("sluice-api", "sluice-worker")
    assert api.parent_span_id == client_span
    # The worker's span is a child of the API's: the traceparent crossed Kafka.
    assert worker.parent_span_id == api.span_id
    assert api.start_ns <= worker.start_ns <= worker.end_ns <= api.end_ns
    # One child span per hop, under its own process's span.
    assert spans[tracing.KAFKA_PRODUCED].parent_span_id == api.span_id
    assert spans[tracing.SSE_FIRST_WRITE].parent_span_id == api.span_id
    assert spans[tracing.WORKER_FIRST_TOKEN].parent_span_id == worker.span_id
    assert spans[tracing.KAFKA_PRODUCED].attributes["partition"] == next(
        h["partition"] for h in hops if h["hop"] == tracing.KAFKA_PRODUCED
    )
