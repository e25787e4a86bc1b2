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


class RequestRejected(ValueError):
    """The engine refused this one request (e.g. too long); the worker keeps serving."""


class EngineDead(RuntimeError):
    """The engine cannot serve anything any more; the worker must exit without committing."""


class Engine(Protocol):
    name: str
    model: str

    # priority: lower is scheduled sooner (interactive 0, batch 1); a backend without a
    # priority scheduler may ignore it.
    def generate(self, request: GenerationRequest, priority: int = 0) -> AsyncIterator[Delta]: ...

    async def abort(self, request_id: str) -> None: ...

    def num_running(self) -> int: ...

    async def shutdown(self) -> None: ...
