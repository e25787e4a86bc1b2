"""HTTP request and response bodies of the API (the Kafka/Redis contract is shared/messages.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from shared.messages import FinishReason, PromptInput, SamplingOptions, Timings, Usage


class GenerateBody(PromptInput, SamplingOptions):
    """`POST /generate`: OpenAI's field names; unknown fields are rejected, not ignored."""

    max_tokens: int | None = Field(None, gt=0)  # type: ignore[assignment]
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # type: ignore[assignment]
    stream: bool = False

    def sampling(self, default_max_tokens: int) -> SamplingOptions:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingOptions(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stop,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


class GenerateResponse(BaseModel):
    request_id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
