"""LoRA on the real stack: an adapter of the catalog is served by its base model's pool (a
vLLM worker with LoRA on), and answers as the base model with the adapter's update merged into
its weights does in transformers; the base model, asked on the same worker, answers as itself."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from transformers import AutoTokenizer

from shared import devstack
from shared.devstack import LocalStack
from shared.models import model_path
from tests.conftest import ADAPTER, ADAPTER_DIR, LORA_POOL
from tests.lora_adapter import greedy, make_adapter

pytestmark = pytest.mark.stack

PROMPTS = ["The capital of France is", "Name a fruit."]
MAX_TOKENS = 12


async def test_an_adapter_answers_as_its_merged_model_from_its_base_pool(stack: LocalStack) -> None:
    base = model_path(stack.settings)
    tokenizer = AutoTokenizer.from_pretrained(base)
    merged = make_adapter(base, ADAPTER_DIR)
    expected = [greedy(merged, tokenizer, p, MAX_TOKENS) for p in PROMPTS]
    del merged

    def ask(prompt: str, model: str) -> dict:
        return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "model": model,
                "timeout_s": 280}  # fmt: skip

    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        cards = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        assert cards[ADAPTER]["parent"] == LORA_POOL and cards[ADAPTER]["sluice_workers"] == []
        worker = stack.start_worker(cpu=1, model=LORA_POOL)  # its own core (STACK.md)
        try:
            adapted = [await client.post("/generate", json=ask(p, ADAPTER)) for p in PROMPTS]
            plain = [await client.post("/generate", json=ask(p, LORA_POOL)) for p in PROMPTS]
            for r in (*adapted, *plain):
                assert r.status_code == 200, r.text
            served = {r.json()["worker_id"] for r in (*adapted, *plain)}
            assert len(served) == 1 and served != {None}  # the pool's one worker, for both
            assert [r.json()["text"] for r in adapted] == expected
            assert [r.json()["text"] for r in plain] != expected  # the adapter changed them
            chat = {"model": ADAPTER, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
            r = await client.post("/v1/chat/completions", json=chat)
            assert r.status_code == 200 and r.json()["model"] == ADAPTER
            cards = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
            assert [w["worker_id"] for w in cards[ADAPTER]["sluice_workers"]] == list(served)
        finally:
            devstack.stop(worker)
            stack.workers.remove(worker)
        # The tenant's usage names the adapter, not only its base model.
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            usage = (await client.get("/usage", params={"window": "1h"})).json()["by_model"]
            if usage.get(ADAPTER, {}).get("requests") == 3:
                break
            assert asyncio.get_running_loop().time() < deadline, usage
            await asyncio.sleep(1)
        assert usage[LORA_POOL]["requests"] == 2
