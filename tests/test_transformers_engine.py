"""The transformers backend on the default model: its continuous-batching manager, for real.

References are plain `model.generate()` (greedy, one prompt at a time, no batching) and offline
vLLM's greedy output, so the backend is held to both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from shared.devstack import LocalStack
from shared.messages import GenerationRequest, SamplingOptions
from shared.settings import Settings
from tests.conftest import LOG_DIR, PROMPTS, REF_MAX_TOKENS, Services, make_settings
from workers.engines.base import RequestRejected
from workers.engines.transformers import TransformersEngine, load_model


@pytest.fixture(scope="module")
async def engine(model_ready: None) -> AsyncIterator[TransformersEngine]:
    e = TransformersEngine.start(Settings())
    yield e
    await e.shutdown()


@pytest.fixture(scope="module")
def generate_reference(model_ready: None) -> dict[str, str]:
    """Greedy `generate()` of each prompt on its own: no batching, no paged cache."""
    model, tokenizer = load_model(Settings())
    texts = {}
    for prompt in PROMPTS[:8]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=REF_MAX_TOKENS, do_sample=False)
        texts[prompt] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return texts


def request(prompt: str, **sampling: object) -> GenerationRequest:
    sampling = {"max_tokens": REF_MAX_TOKENS, "temperature": 0.0, **sampling}
    return GenerationRequest(
        request_id=f"t-{time.monotonic_ns()}",
        prompt=prompt,
        sampling=SamplingOptions(**sampling),  # type: ignore[arg-type]
        enqueued_at=time.time(),
    )


async def run(engine: TransformersEngine, req: GenerationRequest) -> tuple[str, str | None, int]:
    parts, finish, tokens = [], None, 0
    async for delta in engine.generate(req):
        parts.append(delta.text)
        tokens += delta.num_tokens
        finish = delta.finish_reason
    return "".join(parts), finish, tokens


async def test_concurrent_greedy_streams_match_generate_and_vllm(
    engine: TransformersEngine,
    generate_reference: dict[str, str],
    greedy_reference: dict[str, str],
) -> None:
    prompts = PROMPTS[:8]
    outs = await asyncio.gather(*(run(engine, request(p)) for p in prompts))
    for prompt, (text, finish, tokens) in zip(prompts, outs, strict=True):
        assert text == generate_reference[prompt], prompt
        assert text == greedy_reference[prompt], prompt
        assert finish in ("stop", "length")
        assert 0 < tokens <= REF_MAX_TOKENS
    assert engine.num_running() == 0


async def test_stop_string_cuts_the_text_and_ends_the_request(
    engine: TransformersEngine, generate_reference: dict[str, str]
) -> None:
    prompt = PROMPTS[0]
    full = generate_reference[prompt]
    stop = " fundamental"  # from the middle of the greedy text
    assert stop in full
    text, finish, _ = await run(engine, request(prompt, stop=[stop]))
    assert text == full[: full.index(stop)]
    assert finish == "stop"


async def test_ignore_eos_gives_exactly_max_tokens(engine: TransformersEngine) -> None:
    text, finish, tokens = await run(engine, request("Hi", max_tokens=40, ignore_eos=True))
    assert (tokens, finish) == (40, "length")
    assert text


async def test_sampling_follows_temperature(engine: TransformersEngine) -> None:
    prompt = "Name a colour:"
    hot = await asyncio.gather(
        *(run(engine, request(prompt, temperature=1.5, max_tokens=12)) for _ in range(6))
    )
    cold = await asyncio.gather(*(run(engine, request(prompt, max_tokens=12)) for _ in range(3)))
    assert len({t for t, _, _ in cold}) == 1  # greedy is deterministic, even batched
    assert len({t for t, _, _ in hot}) > 1  # six samples at T=1.5 do not all agree


async def test_abort_stops_a_running_request_and_the_engine_keeps_serving(
    engine: TransformersEngine, generate_reference: dict[str, str]
) -> None:
    req = request("Count from one to a thousand:", max_tokens=500, ignore_eos=True)
    tokens = 0
    async for delta in engine.generate(req):
        tokens += delta.num_tokens
        if tokens >= 3:
            await engine.abort(req.request_id)
    assert 3 <= tokens < 500
    assert engine.num_running() == 0
    text, _, _ = await run(engine, request(PROMPTS[2]))
    assert text == generate_reference[PROMPTS[2]]


async def test_unsupported_or_too_long_requests_are_rejected(engine: TransformersEngine) -> None:
    with pytest.raises(RequestRejected, match="seed"):
        await run(engine, request("Hi", seed=1))
    with pytest.raises(RequestRejected, match="response_format"):
        await run(engine, request("Hi", response_format={"type": "json_object"}))
    with pytest.raises(RequestRejected, match=r"presence_penalty.*stop_token_ids"):
        await run(engine, request("Hi", presence_penalty=1.0, stop_token_ids=[3]))
    with pytest.raises(RequestRejected, match="context length"):
        await run(engine, request("word " * 2100))
    assert engine.num_running() == 0


@pytest.mark.stack
async def test_worker_with_transformers_engine_serves_the_api(
    services: Services, greedy_reference: dict[str, str]
) -> None:
    """SLUICE_ENGINE=transformers end to end: API -> Kafka -> worker -> Redis -> SSE."""
    import httpx

    from shared import devstack

    settings = make_settings(services, engine="transformers", port=devstack.free_port())
    stack = LocalStack(settings, LOG_DIR)
    stack.start_worker()
    stack.start_api()
    try:
        stack.wait_ready()
        async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
            body = {"prompt": PROMPTS[0], "max_tokens": REF_MAX_TOKENS, "temperature": 0}
            r = await client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == greedy_reference[PROMPTS[0]]
    finally:
        stack.stop()
