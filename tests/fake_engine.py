"""A deterministic stand-in engine, only for fast tests of the worker's queue logic (batching,
commits, dead letters, coalescing). Whether Sluice generates correctly is proven against vLLM in
test_generate_e2e.py, never with this."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from shared.messages import GenerationRequest
from workers.engines.base import Delta, EngineDead, RequestRejected


class FakeEngine:
    name = "fake"
    model = "fake-model"

    def __init__(self, token_delay_s: float = 0.0) -> None:
        self.token_delay_s = token_delay_s
        self.running: set[str] = set()
        self.max_running = 0
        self.started = asyncio.Event()
        # Wall span in which the engine had work (tests compare cost attribution with it).
        self.busy_since: float | None = None
        self.busy_until: float | None = None
        self.generated: list[str] = []  # request ids in the order they were started
        self.completed: list[str] = []  # ... and in the order they ran to the end
        self.priorities: dict[str, int] = {}
        self.aborted: list[str] = []
        self.restarts = 0
        self.resumed: dict[str, list[int]] = {}  # request id -> the ids it was resumed after

    async def generate(
        self, request: GenerationRequest, priority: int = 0, resume: list[int] | None = None
    ) -> AsyncIterator[Delta]:
        if request.prompt == "reject me":
            raise RequestRejected("prompt refused by the fake engine")
        if request.prompt == "kill the engine":
            self.generated.append(request.request_id)
            raise EngineDead("the fake engine died on this prompt")
        self.generated.append(request.request_id)
        self.resumed[request.request_id] = list(resume or [])
        self.priorities[request.request_id] = priority
        self.running.add(request.request_id)
        self.started.set()
        self.busy_since = self.busy_since or time.monotonic()
        self.max_running = max(self.max_running, len(self.running))
        try:
            # Token i is id i and text "t{i} ", so a continuation is easy to check.
            n = request.sampling.max_tokens
            for i in range(len(resume or []), n):
                await asyncio.sleep(self.token_delay_s)
                yield Delta(
                    text=f"t{i} ",
                    num_tokens=1,
                    prompt_tokens=3,
                    finish_reason="length" if i == n - 1 else None,
                    token_ids=(i,),
                )
            self.completed.append(request.request_id)
        finally:
            self.running.discard(request.request_id)
            self.busy_until = time.monotonic()

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running.discard(request_id)

    def num_running(self) -> int:
        return len(self.running)

    async def restart(self) -> None:
        self.restarts += 1

    async def shutdown(self) -> None:
        pass
