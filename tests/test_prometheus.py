"""A real Prometheus server (Debian's package, installed by `make monitoring-check`) scrapes a
running stack; after some traffic its HTTP API must return TTFT, token, lag and worker series."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from shared import devstack
from shared.devstack import LocalStack
from tests.conftest import LOG_DIR, PROMPTS, Services, make_settings

pytestmark = pytest.mark.stack

RULES = Path(__file__).resolve().parent.parent / "monitoring" / "rules"


@pytest.fixture(scope="module")
def scraped(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    if shutil.which("prometheus") is None:
        pytest.skip("no prometheus binary (make monitoring-check installs Debian's)")
    settings = make_settings(
        services, port=devstack.free_port(), worker_metrics_port=devstack.free_port()
    )
    stack = LocalStack(settings, LOG_DIR)
    stack.start_worker()
    stack.start_api()
    prom_port = devstack.free_port()
    tmp = tmp_path_factory.mktemp("prometheus")
    targets = {"sluice-api": settings.port, "sluice-worker": settings.worker_metrics_port}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in sorted(RULES.glob("*.yml"))],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
            for job, port in targets.items()
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(LOG_DIR / "prometheus.log", "ab")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        devstack.wait_port("127.0.0.1", prom_port, timeout_s=30)
        stack.wait_ready()
        yield stack, f"http://127.0.0.1:{prom_port}"
    finally:
        devstack.stop(prom)
        log.close()
        stack.stop()


async def query(prometheus: str, promql: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=prometheus, timeout=10) as client:
        r = await client.get("/api/v1/query", params={"query": promql})
    r.raise_for_status()
    return r.json()["data"]["result"]


async def eventually(prometheus: str, promql: str, timeout_s: float = 30) -> float:
    """The first sample of `promql` once it has one (scrapes are every second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = await query(prometheus, promql)
        if result:
            return float(result[0]["value"][1])
        await asyncio.sleep(1)
    names = await query(prometheus, 'count by (__name__) ({job="sluice-worker"})')
    seen = sorted(n["metric"]["__name__"] for n in names)
    raise AssertionError(f"no series for {promql} after {timeout_s:g} s; worker has {seen}")


async def test_prometheus_sees_latency_tokens_lag_and_workers(scraped: tuple) -> None:
    stack, prometheus = scraped
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        bodies = [{"prompt": p, "max_tokens": 16, "temperature": 0} for p in PROMPTS[:6]]
        for r in await asyncio.gather(*(client.post("/generate", json=b) for b in bodies)):
            assert r.status_code == 200, r.text
    assert await eventually(prometheus, 'up{job="sluice-api"} == 1') == 1
    assert await eventually(prometheus, 'up{job="sluice-worker"} == 1') == 1
    assert await eventually(prometheus, "sum(sluice_time_to_first_token_seconds_count) >= 6") >= 6
    assert await eventually(prometheus, "sum(vllm:generation_tokens_total) >= 6") >= 6
    # Every process exports the gauge; the API sets it (hence max, as the alert rule does).
    assert await eventually(prometheus, "max(sluice_live_workers)") == 1
    # Every partition fetched from reports its lag; all served, so the backlog is empty.
    assert await eventually(prometheus, "sum(sluice_kafka_consumer_lag)") == 0
    assert await eventually(prometheus, "sum(sluice_cost_dollars_total) > 0") > 0
    # A recording rule, evaluated by Prometheus itself from the scraped histograms.
    assert await eventually(prometheus, "sluice:time_to_first_token_seconds:p50 > 0", 90) > 0
