"""Two model pools in one stack: the bundled model on vLLM (the default pool) and on the
transformers engine (`smollm-hf`, shared/pools.py). Each request is served only by its model's
pool (the done event names the worker); a pool at zero workers takes requests, which wait in
its topic, the client told so every few seconds, until a worker starts; an unknown model is a
404."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from httpx_sse import aconnect_sse

from api.streaming import QUEUED_EVERY_S
from shared import devstack
from shared.devstack import LocalStack
from tests.conftest import SECOND_POOL

pytestmark = pytest.mark.stack


async def stream(client: httpx.AsyncClient, body: dict) -> list[tuple[str, dict]]:
    async with aconnect_sse(client, "POST", "/generate", json=body) as source:
        assert source.response.status_code == 200
        return [(e.event, json.loads(e.data)) async for e in source.aiter_sse()]


async def card(client: httpx.AsyncClient, model: str) -> dict:
    models = (await client.get("/v1/models")).json()["data"]
    return next(m for m in models if m["id"] == model)


async def test_each_pool_serves_only_its_model_and_a_pool_may_start_at_zero(
    stack: LocalStack,
) -> None:
    ask = {"prompt": "Name a fruit.", "max_tokens": 8, "temperature": 0}
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        assert (await card(client, SECOND_POOL))["sluice_workers"] == []
        # No worker in its pool: accepted, and waiting in the pool's own topic, saying so.
        body = {**ask, "model": SECOND_POOL, "timeout_s": 280, "stream": True}
        waiting = asyncio.create_task(stream(client, body))
        defaults = [(await client.post("/generate", json=ask)).json() for _ in range(2)]
        await asyncio.sleep(QUEUED_EVERY_S + 1)
        assert not waiting.done()
        default_workers = {d["worker_id"] for d in defaults}
        assert len(default_workers) == 1 and None not in default_workers

        worker = stack.start_worker(model=SECOND_POOL)
        try:
            events = await asyncio.wait_for(waiting, 290)
            kinds = [kind for kind, _ in events]
            assert kinds[0] == "queued" and kinds[-1] == "done" and "token" in kinds
            first = events[0][1]
            assert first["workers"] == 0 and first["backlog"] >= 1 and first["waited_s"] >= 4
            assert "queued" not in kinds[kinds.index("token") :]
            pool_worker = events[-1][1]["worker_id"]
            assert pool_worker and pool_worker not in default_workers
            listed = await card(client, SECOND_POOL)
            assert [w["worker_id"] for w in listed["sluice_workers"]] == [pool_worker]
            assert listed["sluice_workers"][0]["engine"] == "transformers"
            # Requests for each model go to that model's pool, and only there.
            mixed = await asyncio.gather(
                *(client.post("/generate", json={**ask, "model": SECOND_POOL}) for _ in range(3)),
                *(client.post("/generate", json=ask) for _ in range(3)),
            )
            assert [r.json()["worker_id"] for r in mixed] == [pool_worker] * 3 + [
                *default_workers
            ] * 3
            # The OpenAI surface routes by `model` too.
            chat = {"model": SECOND_POOL, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
            r = await client.post("/v1/chat/completions", json=chat)
            assert r.status_code == 200 and r.json()["model"] == SECOND_POOL
        finally:
            devstack.stop(worker)
            stack.workers.remove(worker)
        unknown = await client.post("/generate", json={**ask, "model": "no-such-model"})
        assert unknown.status_code == 404 and "no-such-model" in unknown.json()["detail"]
        # Cost breaks down by model: each pool's engine time went to its own model, in the
        # fleet's report and in the tenant's own usage (5 requests of the second pool above).
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            by_model = (await client.get("/cost", params={"window": "1h"})).json()["by_model_usd"]
            usage = (await client.get("/usage", params={"window": "1h"})).json()["by_model"]
            pool_usage = usage.get(SECOND_POOL, {"requests": 0})
            if (
                by_model.get(SECOND_POOL, 0) > 0
                and by_model.get(stack.settings.model, 0) > 0
                and pool_usage["requests"] == 5
            ):
                break
            assert asyncio.get_running_loop().time() < deadline, (by_model, usage)
            await asyncio.sleep(1)
        assert pool_usage["cost_usd"] > 0 and pool_usage["completion_tokens"] > 0
        assert usage[stack.settings.model]["requests"] >= 3
