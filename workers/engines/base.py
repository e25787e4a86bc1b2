"""The engine interface a worker drives: stream one request, abort one, shut down.

Kept this small on purpose so another backend (transformers, a remote engine) is one file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from shared.messages import GenerationRequest


@dataclass(frozen=True)
class Delta:
    """What the engine produced since the previous delta of the same request."""

    text: str
    num_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None
    token_ids: tuple[int, ...] = ()  # the new tokens' ids: what a takeover continues from
    # With sampling.logprobs, per new token: (its text, its log probability, the top ones)
    logprobs: tuple[TokenLogprobs, ...] = ()
    # Wall times the engine first scheduled the request and sampled its first token, when the
    # engine keeps them (for the request's trace)
    scheduled_at: float | None = None
    sampled_at: float | None = None


TokenLogprobs = tuple[str, float, tuple[tuple[str, float], ...]]


class RequestRejected(ValueError):
    """The engine refused this one request (e.g. too long); the worker keeps serving."""


class EngineDead(RuntimeError):
    """The engine cannot serve anything any more; the worker must exit without committing."""


class Engine(Protocol):
    name: str
    model: str

    # priority: lower is scheduled sooner (interactive 0, batch 1); a backend without a
    # priority scheduler may ignore it. resume: token ids of the completion a previous worker
    # already published; the engine continues after them (one prefill of prompt + resume)
    # and generates at most max_tokens - len(resume) more. Deltas count only the new tokens;
    # prompt_tokens stays the prompt's own.
    def generate(
        self, request: GenerationRequest, priority: int = 0, resume: list[int] | None = None
    ) -> AsyncIterator[Delta]: ...

    async def abort(self, request_id: str) -> None: ...

    def num_running(self) -> int: ...

    async def restart(self) -> None:
        """Replace a dead engine with a new one (raises if this backend cannot)."""

    async def shutdown(self) -> None: ...
