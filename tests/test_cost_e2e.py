"""GET /cost and `sluice cost report` on the real stack: every request the worker served is in
the fleet ledger, with the cost its done event reported."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse

from shared.devstack import LocalStack
from shared.settings import DEFAULT_MODEL
from tests.conftest import PROMPTS

pytestmark = pytest.mark.stack

FLUSH_S = 6  # workers/usage.py writes the ledger every 5 s


@pytest.fixture
async def client(stack: LocalStack):
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as c:
        yield c


async def report(client: httpx.AsyncClient) -> dict:
    r = await client.get("/cost", params={"window": "1h"})
    assert r.status_code == 200, r.text
    return r.json()


async def test_cost_report_accounts_for_every_request(client: httpx.AsyncClient) -> None:
    await asyncio.sleep(FLUSH_S)  # earlier tests' requests settle into the ledger first
    before = await report(client)
    bodies = [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in PROMPTS[:4]]
    done = [
        r.json() for r in await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))
    ]
    assert all(d["cost_usd"] > 0 for d in done)

    after = before
    for _ in range(10):
        await asyncio.sleep(1.5)
        after = await report(client)
        if after["requests"] - before["requests"] >= 4:
            break
    assert after["requests"] - before["requests"] == 4
    completion = sum(d["usage"]["completion_tokens"] for d in done)
    assert after["completion_tokens"] - before["completion_tokens"] == completion
    spent = after["attributed_usd"] - before["attributed_usd"]
    assert spent == pytest.approx(sum(d["cost_usd"] for d in done), rel=1e-6)

    assert after["worker_hours"] > before["worker_hours"] > 0
    assert 0 < after["utilization"] <= 1
    assert after["fleet_usd"] >= after["attributed_usd"]
    assert after["per_1k_requests_usd"] == pytest.approx(
        after["fleet_usd"] / after["requests"] * 1000
    )
    monthly = after["monthly"]
    assert monthly["total_usd"] > monthly["fixed_usd"] > 0
    assert monthly["requests_at_full_utilization"] >= monthly["requests_at_current_rate"] > 0
    assert after["by_tenant_usd"]["default"] > 0
    # The test's traffic is a trickle on an always-on worker: it should be told so.
    assert any(r["id"] == "right_size" for r in after["recommendations"])


async def test_cost_window_is_validated(client: httpx.AsyncClient) -> None:
    r = await client.get("/cost", params={"window": "soon"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["query", "window"]


def test_cli_report_reads_the_same_ledger(stack: LocalStack) -> None:
    sluice = Path(sys.executable).with_name("sluice")
    env = {**os.environ, **stack.env}
    out = subprocess.run(
        [sluice, "cost", "report", "--window", "1h", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(out.stdout)
    assert data["requests"] >= 4 and data["fleet_usd"] > 0
    text = subprocess.run(
        [sluice, "cost", "report"], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "per 1k requests" in text and "Monthly projection" in text


async def test_stream_latency_metrics_are_exported(client: httpx.AsyncClient) -> None:
    body = {"prompt": PROMPTS[5], "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    async with aconnect_sse(client, "POST", "/generate", json={**body, "stream": True}) as src:
        events = [sse.event async for sse in src.aiter_sse()]
    assert events.count("token") == 16 and events[-1] == "done"
    text = (await client.get("/metrics")).text
    counts = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.endswith(tuple("0123456789")) and "_count" in line
    }
    # The client-side latencies are by model (the catalog's name the request asked for).
    model = f'{{model_name="{DEFAULT_MODEL}"}}'
    assert counts[f"sluice_inter_token_latency_seconds_count{model}"] > 0
    assert counts[f"sluice_time_to_first_token_seconds_count{model}"] > 0
    assert counts["sluice_stream_delivery_latency_seconds_count"] > 0
