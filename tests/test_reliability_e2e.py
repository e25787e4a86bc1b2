"""Faults on a real stack of its own (two vLLM workers, the API, and a Redis and a dev broker of
its own so that they can be restarted): a worker SIGKILLed mid-stream, the API restarted, Redis
restarted, a client that leaves, an explicit cancel, and last the broker restarted.
docs/RELIABILITY.md reports what these show."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse

from shared import devstack
from shared.devstack import LocalStack
from tests.conftest import LOG_DIR, PROMPTS, REF_MAX_TOKENS, Services, make_settings

pytestmark = pytest.mark.stack
LOGS = LOG_DIR / "reliability"


@dataclass
class Stream:
    tokens: list[dict] = field(default_factory=list)
    done: dict | None = None
    request_id: str = ""
    started: asyncio.Event = field(default_factory=asyncio.Event)  # first token arrived
    wanted: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)  # `wanted` tokens arrived
    arrivals: list[float] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(t["text"] for t in self.tokens)

    @property
    def indices(self) -> list[int]:
        return [t["index"] for t in self.tokens]


Start = Callable[[int, Path], subprocess.Popen[bytes]]  # devstack.start_redis, start_broker


class Server:
    """A Redis or dev broker of this module's own, on a fixed port, so that it can be restarted
    cold: both keep nothing on disk (the broker: no topics, messages or groups)."""

    def __init__(self, start: Start, log: Path) -> None:
        self.port = devstack.free_port()
        self._start, self._log = start, log
        self.proc = start(self.port, log)

    def restart(self, down_s: float) -> None:
        devstack.stop(self.proc)
        time.sleep(down_s)
        self.proc = self._start(self.port, self._log)


@pytest.fixture(scope="module")
def broker_server() -> Iterator[Server]:
    server = Server(devstack.start_broker, LOGS / "broker.log")
    yield server
    devstack.stop(server.proc)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[Server]:
    server = Server(devstack.start_redis, LOGS / "redis.log")
    yield server
    devstack.stop(server.proc)


@pytest.fixture(scope="module")
def stack(
    services: Services,
    redis_server: Server,
    broker_server: Server,
    greedy_reference: dict,
) -> Iterator[LocalStack]:
    redis = f"redis://127.0.0.1:{redis_server.port}/0"
    kafka = f"127.0.0.1:{broker_server.port}"
    settings = make_settings(services, redis=redis, kafka=kafka, port=devstack.free_port())
    s = LocalStack(settings, LOGS)
    s.start_worker()
    s.start_worker()
    s.start_api()
    try:
        s.wait_ready()
        _wait_workers(s, 2)
        yield s
    finally:
        s.stop()


def _wait_workers(stack: LocalStack, n: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with httpx.Client(base_url=stack.url) as c:
            if c.get("/ready").json().get("live_workers", 0) >= n:
                return
        time.sleep(1)
    raise TimeoutError(f"{n} workers not live")


@pytest.fixture
async def client(stack: LocalStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as c:
        yield c


def greedy(prompt: str, **extra: object) -> dict:
    return {"prompt": prompt, "max_tokens": REF_MAX_TOKENS, "temperature": 0, **extra}


async def read(
    client: httpx.AsyncClient,
    stream: Stream,
    method: str,
    url: str,
    body: dict | None = None,
    headers: dict | None = None,
    stop_after: int | None = None,
) -> Stream:
    """Read SSE into `stream` until done (or `stop_after` tokens: then hang up)."""
    kwargs = {"json": {**body, "stream": True}} if body else {}
    async with aconnect_sse(client, method, url, headers=dict(headers or {}), **kwargs) as src:
        assert src.response.status_code == 200, await src.response.aread()
        stream.request_id = src.response.headers.get("x-request-id", stream.request_id)
        async for sse in src.aiter_sse():
            data = json.loads(sse.data)
            if sse.event == "token":
                stream.tokens.append(data)
                stream.arrivals.append(time.monotonic())
                stream.started.set()
                if stream.wanted and len(stream.tokens) >= stream.wanted:
                    stream.reached.set()
                if stop_after is not None and len(stream.tokens) >= stop_after:
                    return stream
            elif sse.event == "done":
                stream.done = data
                return stream
            else:
                raise AssertionError(f"{sse.event}: {sse.data}")
    return stream


async def in_flight(client: httpx.AsyncClient, stack: LocalStack) -> dict[str, int]:
    """worker id -> requests it holds, from the heartbeats (what /v1/models shows)."""
    models = (await client.get("/v1/models")).json()["data"]
    return {w["worker_id"]: w["in_flight"] for m in models for w in m["sluice_workers"]}


async def test_worker_sigkill_mid_stream_loses_and_repeats_nothing(
    client: httpx.AsyncClient, stack: LocalStack, greedy_reference: dict[str, str]
) -> None:
    streams = [Stream() for _ in PROMPTS]
    tasks = [
        asyncio.create_task(read(client, s, "POST", "/generate", greedy(p)))
        for s, p in zip(streams, PROMPTS, strict=True)
    ]
    # Both workers hold some of the 16 and tokens are flowing: kill the first worker.
    deadline = time.monotonic() + 120
    while (
        sum(len(s.tokens) > 0 for s in streams) < 4
        or min((await in_flight(client, stack)).values(), default=0) == 0
    ):
        assert time.monotonic() < deadline, "streams did not start on both workers"
        await asyncio.sleep(0.2)
    victim = stack.workers[0]
    devstack.kill_group(victim)  # SIGKILL to the worker and its engine processes, as a pod dies
    killed_at = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=240)
        recovered_after = time.monotonic() - killed_at
        for prompt, s in zip(PROMPTS, streams, strict=True):
            assert s.done is not None, prompt
            assert s.indices == list(range(len(s.tokens))), prompt  # none repeated or missing
            assert s.text == greedy_reference[prompt], prompt
    finally:
        # A fresh worker takes the dead one's place for the tests that follow.
        stack.workers.remove(victim)
        stack.start_worker()
        _wait_workers(stack, 2)
    # For docs/RELIABILITY.md: how long the dead worker's clients waited.
    # The longest a client waited for its next token after the kill (a replayed token adds no
    # arrival: the API drops it).
    waits = [
        b - a
        for s in streams
        for a, b in itertools.pairwise([killed_at, *(t for t in s.arrivals if t > killed_at)])
    ]
    summary = {"recovered_after_s": recovered_after, "longest_wait_s": max(waits, default=0.0)}
    (LOGS / "sigkill.json").write_text(json.dumps(summary))


async def test_api_restart_and_resume_with_last_event_id(
    client: httpx.AsyncClient, stack: LocalStack, greedy_reference: dict[str, str]
) -> None:
    prompt = PROMPTS[3]
    first = Stream(wanted=5)
    reading = asyncio.create_task(read(client, first, "POST", "/generate", greedy(prompt)))
    await asyncio.wait_for(first.reached.wait(), timeout=120)
    assert stack.api is not None
    # The API dies under a connected client (a client that hangs up itself cancels instead);
    # the worker keeps generating.
    stack.api.send_signal(signal.SIGKILL)
    stack.api.wait()
    with contextlib.suppress(httpx.HTTPError):
        await reading
    stack.start_api()
    await asyncio.to_thread(stack.wait_ready)

    rest = Stream()
    last = str(first.indices[-1])
    url = f"/requests/{first.request_id}/stream"
    await read(client, rest, "GET", url, headers={"Last-Event-ID": last})
    assert rest.done is not None
    n = len(first.tokens)
    assert rest.indices == list(range(n, n + len(rest.tokens)))
    assert first.text + rest.text == greedy_reference[prompt]

    r = await client.get("/requests/0123456789abcdef0123456789abcdef/stream")
    assert r.status_code == 404


async def test_redis_restart_mid_stream(
    client: httpx.AsyncClient, redis_server: Server, greedy_reference: dict[str, str]
) -> None:
    prompt = PROMPTS[6]
    stream = Stream()
    task = asyncio.create_task(read(client, stream, "POST", "/generate", greedy(prompt)))
    await asyncio.wait_for(stream.started.wait(), timeout=120)
    await asyncio.to_thread(redis_server.restart, 1.0)
    await asyncio.wait_for(task, timeout=120)
    assert stream.done is not None
    assert stream.indices == list(range(len(stream.tokens)))
    assert stream.text == greedy_reference[prompt]


async def test_client_that_leaves_cancels_its_request(
    client: httpx.AsyncClient, stack: LocalStack
) -> None:
    await _wait_idle(client, stack)
    body = {"prompt": "Tell me a long story.", "max_tokens": 512, "ignore_eos": True}
    await read(client, Stream(), "POST", "/generate", body, stop_after=3)  # and hang up
    await _released_soon(client, stack)


async def test_v1_stream_client_that_leaves_cancels_too(
    client: httpx.AsyncClient, stack: LocalStack
) -> None:
    await _wait_idle(client, stack)
    body = {
        "model": stack.settings.model,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 512,
        "stream": True,
    }
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        chunks = 0
        async for line in r.aiter_lines():
            chunks += line.startswith("data: {")
            # /v1 has no ignore_eos: hang up only once a heartbeat shows the answer still
            # being written, so that there is something to cancel.
            if chunks >= 3 and any((await in_flight(client, stack)).values()):
                break
        else:
            pytest.fail("the answer ended before a heartbeat showed it running")
    await _released_soon(client, stack)


async def test_non_streamed_client_that_leaves_cancels_too(
    client: httpx.AsyncClient, stack: LocalStack
) -> None:
    await _wait_idle(client, stack)
    body = {"prompt": "Tell me a long story.", "max_tokens": 512, "ignore_eos": True}
    waiting = asyncio.create_task(client.post("/generate", json=body))
    deadline = time.monotonic() + 60
    while not any((await in_flight(client, stack)).values()):
        assert time.monotonic() < deadline, "no worker took the request"
        await asyncio.sleep(0.1)
    waiting.cancel()  # httpx closes the connection under a cancelled request: a hang-up
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await _released_soon(client, stack)  # the API polls its client every 0.5 s


async def test_delete_cancels_and_deadline_times_out(
    client: httpx.AsyncClient, stack: LocalStack
) -> None:
    body = {"prompt": "Tell me a long story.", "max_tokens": 512, "ignore_eos": True}
    stream = Stream()
    task = asyncio.create_task(read(client, stream, "POST", "/generate", body))
    await asyncio.wait_for(stream.started.wait(), timeout=120)
    r = await client.delete(f"/requests/{stream.request_id}")
    assert r.status_code == 202
    await asyncio.wait_for(task, timeout=10)
    assert stream.done is not None and stream.done["finish_reason"] == "abort"
    assert len(stream.tokens) < 512

    # A deadline that passes before any worker can pick the request up: never run.
    late = await read(client, Stream(), "POST", "/generate", {**body, "timeout_s": 0.001})
    assert late.done is not None and late.done["finish_reason"] == "timeout"
    assert late.tokens == [] and late.done["usage"]["completion_tokens"] == 0


async def test_dev_broker_restart_the_queue_recovers_by_itself(
    client: httpx.AsyncClient, stack: LocalStack, broker_server: Server
) -> None:
    """Last in this module. The dev broker comes back empty: what was queued is gone, and until
    the topics are created again (within a second) it acknowledges requests without keeping
    them. The workers notice that their sessions are gone and reconnect without reloading the
    engine; from then on every request is served at once again."""
    await _wait_idle(client, stack)
    body = {"prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
    assert (await client.post("/generate", json=body)).status_code == 200
    await asyncio.to_thread(broker_server.restart, 1.0)
    restarted = time.monotonic()
    outcomes: list[str] = []  # one per request sent until the first was served
    while not outcomes or outcomes[-1] != "served":
        assert time.monotonic() - restarted < 180, outcomes
        r = await client.post("/generate", json={**body, "timeout_s": 30})
        if r.status_code == 200 and r.json()["finish_reason"] == "length":
            outcomes.append("served")
        elif r.status_code == 200:  # reached a worker only after its deadline
            outcomes.append(r.json()["finish_reason"])
        else:  # 503: not enqueued; 504: acknowledged by the broker but never delivered
            assert r.status_code in (503, 504), r.text
            outcomes.append(str(r.status_code))
            await asyncio.sleep(1)
    recovered_after = time.monotonic() - restarted
    after: list[float] = []
    for _ in range(6):
        start = time.monotonic()
        r = await client.post("/generate", json=body)
        if r.status_code == 503:  # once per partition the broker half-remembers (a retry)
            outcomes.append("503 after")
            r = await client.post("/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        after.append(time.monotonic() - start)
    # Served, none lost. One may still wait while the other worker's reconnect rebalances the
    # group (seen: 18 s on the dev broker, whose joins take 5-18 s).
    assert max(after) < 30, after
    summary = {"recovered_after_s": recovered_after, "outcomes": outcomes, "after_s": after}
    (LOGS / "broker-restart.json").write_text(json.dumps(summary))


async def _released_soon(client: httpx.AsyncClient, stack: LocalStack) -> None:
    """After a client hung up: every worker idle within 3 s. Heartbeats come every 0.5 s here,
    and the 512-token answers these tests ask for would take ~30 s to finish by themselves."""
    left = time.monotonic()
    await _wait_idle(client, stack, timeout_s=10)
    assert time.monotonic() - left < 3


async def _wait_idle(client: httpx.AsyncClient, stack: LocalStack, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while any((await in_flight(client, stack)).values()):
        assert time.monotonic() < deadline, "workers still hold requests"
        await asyncio.sleep(0.1)
