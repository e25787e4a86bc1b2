"""The cost report's arithmetic and recommendations, and the ledger on a real Redis."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared import cost, ledger
from shared import redis as sredis
from shared.settings import Settings
from tests.conftest import Services, make_settings

HOUR = 3600.0


def totals(**values: float) -> dict[str, float]:
    base = {"worker_seconds": HOUR, "busy_seconds": HOUR * 0.8, "request_seconds": HOUR * 8}
    return {**base, **values}


def test_per_request_and_per_token_costs_use_what_the_fleet_cost(services: Services) -> None:
    settings = make_settings(services, instance_hourly_usd=2.0)
    t = totals(requests=1000, prompt_tokens=300_000, completion_tokens=200_000, dollars=1.5)
    r = cost.build_report(t, settings, window_s=HOUR)
    assert r.fleet_usd == pytest.approx(2.0)  # one worker for one hour
    assert r.attributed_usd == pytest.approx(1.5)
    assert r.idle_usd == pytest.approx(0.5)
    assert r.per_request_usd == pytest.approx(0.002)
    assert r.per_1k_requests_usd == pytest.approx(2.0)
    assert r.per_1m_tokens_usd == pytest.approx(4.0)  # $2 for 0.5M tokens
    assert r.utilization == pytest.approx(0.8)
    assert r.mean_batch_size == pytest.approx(10.0)
    m = r.monthly
    assert m.workers == pytest.approx(1.0)
    assert m.instances_usd == pytest.approx(2.0 * 730)
    assert m.total_usd == pytest.approx(2.0 * 730 + 75 + 35)
    assert m.requests_at_current_rate == pytest.approx(730_000)
    assert m.requests_at_full_utilization == pytest.approx(730_000 / 0.8)
    assert m.per_1k_requests_at_full_utilization_usd == pytest.approx(2.0 * 0.8)
    assert r.recommendations == []  # busy, no preemption, no batch traffic


def test_spot_discount_and_gpus_per_instance_price_a_worker() -> None:

    s = Settings(instance_hourly_usd=8.0, gpus_per_instance=4, spot_discount=0.5)
    assert cost.worker_hourly_usd(s) == pytest.approx(1.0)


def test_idle_fleet_is_told_to_scale_down_with_the_saving(services: Services) -> None:
    settings = make_settings(services, instance_hourly_usd=1.0)
    # Four workers whose engines were busy 10% of the time: one is enough at 70%.
    t = totals(worker_seconds=4 * HOUR, busy_seconds=0.4 * HOUR, requests=100)
    r = cost.build_report(t, settings, window_s=HOUR)
    (rec,) = r.recommendations
    assert rec.id == "right_size"
    assert "run 1 worker(s) instead of 4.0" in rec.action
    assert rec.monthly_saving_usd == pytest.approx(3 * 730)
    # One idle worker: scale to zero, saving the idle share beyond the target.
    t = totals(worker_seconds=HOUR, busy_seconds=0.07 * HOUR, requests=10)
    (rec,) = cost.build_report(t, settings, window_s=HOUR).recommendations
    assert "scale workers to zero" in rec.action
    assert rec.monthly_saving_usd == pytest.approx(730 * (1 - 0.1))


def test_preemptions_recommend_int8_unless_already_quantized(services: Services) -> None:
    settings = make_settings(services, instance_hourly_usd=1.0)
    t = totals(requests=100, preemptions=20, kv_usage_seconds=0.8 * HOUR * 0.95)
    (rec,) = cost.build_report(t, settings, window_s=HOUR).recommendations
    assert rec.id == "int8" and "SLUICE_QUANTIZATION=int8" in rec.action
    assert rec.monthly_saving_usd == pytest.approx(730 * 20 * 0.5 / 100)
    quantized = make_settings(services, instance_hourly_usd=1.0, quantization="int8")
    assert cost.build_report(t, quantized, window_s=HOUR).recommendations == []


def test_batch_traffic_on_demand_is_told_to_use_spot(services: Services) -> None:
    settings = make_settings(services, instance_hourly_usd=1.0)
    t = totals(
        requests=100,
        **{
            f"dollars@topic:{settings.requests_topic}": 0.15,
            # Another model pool's interactive topic is not batch traffic; its batch topic is.
            f"dollars@topic:{settings.requests_topic}.tiny": 0.10,
            f"dollars@topic:{settings.batch_requests_topic}.tiny": 0.75,
            "dollars@tenant:default": 1.0,
            f"dollars@model:{settings.model}": 0.15,
            "dollars@model:tiny": 0.85,
        },
    )
    r = cost.build_report(t, settings, window_s=HOUR)
    assert r.by_tenant_usd == {"default": 1.0}
    assert r.by_model_usd == {settings.model: 0.15, "tiny": 0.85}
    (rec,) = r.recommendations
    assert rec.id == "spot_for_batch"
    assert rec.monthly_saving_usd == pytest.approx(730 * 0.75 * 0.6)
    on_spot = make_settings(services, instance_hourly_usd=1.0, spot_discount=0.6)
    assert cost.build_report(t, on_spot, window_s=HOUR).recommendations == []


def test_an_empty_window_reports_no_per_request_figures(services: Services) -> None:
    r = cost.build_report({}, make_settings(services), window_s=HOUR)
    assert r.requests == 0 and r.per_request_usd is None and r.utilization is None
    assert r.monthly.total_usd == pytest.approx(75 + 35)  # fixed costs only
    assert "Recommendations" in cost.render(r)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15m", 900), ("1h", 3600), ("7d", 604800), ("90", 90), ("30", None), ("8d", None)],
)
def test_window_parsing(text: str, seconds: float | None) -> None:
    if seconds is None:
        with pytest.raises(ValueError, match="between 1m and 7d"):
            cost.parse_window(text)
    else:
        assert cost.parse_window(text) == seconds
    with pytest.raises(ValueError, match="duration"):
        cost.parse_window("an hour")


async def test_ledgers_of_several_workers_add_up_within_the_window(services: Services) -> None:
    settings = make_settings(services)
    redis = sredis.connect(settings)
    try:
        a, b = ledger.Ledger(redis, settings), ledger.Ledger(redis, settings)
        for one in (a, b):
            one.add("requests", 3)
            one.add("dollars", 0.25)
            await one.flush()
        a.add("requests", 1)
        await a.flush()
        # Something two hours old is outside a one-hour window (written as a flush would).
        then = time.time() - 2 * HOUR
        for size in (ledger.BUCKET_S, ledger.HOUR_S):
            await redis.hset(ledger.bucket_key(settings, then, size), "requests", 100)
        sums = await ledger.totals(redis, settings, HOUR)
        assert sums == {"requests": 7.0, "dollars": 0.5}
        assert (await ledger.totals(redis, settings, 3 * HOUR))["requests"] == 107.0
        # Minute buckets go after three hours, hour buckets after eight days.
        now = time.time()
        minute_ttl = await redis.ttl(ledger.bucket_key(settings, now))
        hour_ttl = await redis.ttl(ledger.bucket_key(settings, now, ledger.HOUR_S))
        assert 0 < minute_ttl <= ledger.MINUTE_RETENTION_S < hour_ttl <= ledger.RETENTION_S
    finally:
        await redis.aclose()


def test_a_week_is_read_by_the_hour_not_by_the_minute() -> None:
    """`/usage?window=7d` read 10,081 minute hashes a call (and the ledger kept 11,520 of
    them); now a window past two hours reads hour buckets."""
    settings = Settings()
    now = time.time()
    assert len(ledger.window_keys(settings, 7 * 86400, now)) <= 7 * 24 + 1
    assert len(ledger.window_keys(settings, HOUR, now)) <= 61  # short windows keep minutes
    kept = ledger.MINUTE_RETENTION_S // ledger.BUCKET_S + ledger.RETENTION_S // ledger.HOUR_S
    assert kept < 400


async def test_readers_of_a_window_share_one_read(services: Services) -> None:
    """Many `/usage` calls within the cache time cost Redis one read of the window."""
    settings = make_settings(services)
    redis = sredis.connect(settings)
    try:
        writer = ledger.Ledger(redis, settings)
        writer.add("requests", 2)
        await writer.flush()
        cached = ledger.Reader(redis, settings, cache_s=60)
        reads = await asyncio.gather(*(cached.window(HOUR) for _ in range(20)))
        assert {r[1]["requests"] for r in reads} == {2.0} and len({r[0] for r in reads}) == 1
        writer.add("requests", 1)
        await writer.flush()
        assert (await cached.window(HOUR))[1]["requests"] == 2.0  # still the cached read
        fresh = ledger.Reader(redis, settings)
        assert (await fresh.window(HOUR))[1]["requests"] == 3.0
    finally:
        await redis.aclose()


async def test_a_tenants_usage_breaks_down_by_model_and_stays_its_own(services: Services) -> None:
    settings = make_settings(services)
    redis = sredis.connect(settings)
    try:
        book = ledger.Ledger(redis, settings)
        book.add_tenant("acme", "org/chat-7b", 100, 20, 0.5)
        book.add_tenant("acme", "org/chat-7b", 50, 10, 0.25)
        book.add_tenant("acme", "bge-small", 30, 0, 0.01)
        book.add_tenant("acme-2", "org/chat-7b", 999, 999, 9.0)  # a tenant whose name extends
        await book.flush()
        usage = await cost.tenant_usage(ledger.Reader(redis, settings), settings, "acme", HOUR)
        assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (3, 180, 30)
        assert usage.by_model == {
            "bge-small": cost.ModelUsage(
                requests=1, prompt_tokens=30, completion_tokens=0, cost_usd=0.01
            ),
            "org/chat-7b": cost.ModelUsage(
                requests=2, prompt_tokens=150, completion_tokens=30, cost_usd=0.75
            ),
        }
        # The fleet's by-tenant figures are not confused by the per-model fields.
        report = await cost.report(ledger.Reader(redis, settings), settings, HOUR)
        assert report.by_tenant_usd == {"acme": 0.76, "acme-2": 9.0}
    finally:
        await redis.aclose()
