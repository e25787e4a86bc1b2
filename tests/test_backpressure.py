"""Admission control against real Redis heartbeats: the workers' reported lag plus what this
API admitted since decides, and beyond the bound the answer is 429 with Retry-After."""

from __future__ import annotations

import time

import pytest
from fastapi import HTTPException

from api.backpressure import Admission
from api.streaming import StreamHub
from shared import redis as sredis
from shared.messages import Heartbeat
from tests.conftest import Services, make_settings


async def admitted(admission: Admission, n: int) -> int:
    for i in range(n):
        try:
            await admission.check()
        except HTTPException as e:
            assert e.status_code == 429
            assert e.headers is not None and int(e.headers["Retry-After"]) >= 1
            assert "queued" in e.detail
            return i
    return n


async def test_reported_lag_and_fresh_admissions_count_against_the_bound(
    services: Services,
) -> None:
    settings = make_settings(services, max_queued_per_worker=5)
    redis = sredis.connect(settings)
    try:
        beat = Heartbeat(
            worker_id="w1", engine="vllm", model="m", in_flight=2, ts=time.time(), lag=3
        )
        await sredis.write_heartbeat(redis, settings, beat)
        # 3 waiting in Kafka: room for 2 more.
        assert await admitted(Admission(settings, StreamHub(redis, settings)), 10) == 2
        # Two workers each with room: 2 x 5 - 3.
        await sredis.write_heartbeat(
            redis, settings, beat.model_copy(update={"worker_id": "w2", "lag": 0})
        )
        assert await admitted(Admission(settings, StreamHub(redis, settings)), 20) == 7
    finally:
        await redis.aclose()


async def test_with_no_worker_a_bounded_backlog_still_queues(services: Services) -> None:
    """What scales workers up from zero (KEDA on lag), but no more than one worker's worth."""
    settings = make_settings(services, max_queued_per_worker=4)
    redis = sredis.connect(settings)
    try:
        admission = Admission(settings, StreamHub(redis, settings))
        assert await admitted(admission, 10) == 4
        with pytest.raises(HTTPException):
            await admission.check()
    finally:
        await redis.aclose()
