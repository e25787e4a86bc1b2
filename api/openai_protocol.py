"""OpenAI's request and response bodies, as far as Sluice serves them.

Schemas only; the handlers are api/openai_serving.py (the split of vLLM's protocol.py and
serving_*.py). Requests are strict: an unknown field, or a documented one Sluice cannot honour
(tools, best_of, audio ...), is a 400 naming it, never silently ignored. A documented
but unsupported field is accepted only with its neutral value, since clients often send defaults.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from api.schemas import ResponseFormatBody, Seed, StopString
from shared.messages import ChatMessage as WireMessage
from shared.messages import FinishReason

Stop = StopString | Annotated[list[StopString], Field(max_length=4)] | None

# Documented OpenAI fields Sluice cannot honour, with the values that mean "off".
_SHARED_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
}
CHAT_NEUTRAL: dict[str, tuple[Any, ...]] = {
    **_SHARED_NEUTRAL,
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "web_search_options": (None,),
}
COMPLETION_NEUTRAL: dict[str, tuple[Any, ...]] = {
    **_SHARED_NEUTRAL,
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}


def _is(value: Any, neutral: Any) -> bool:
    # True == 1 and False == 0 in Python: a bool is neutral only where the neutral is a bool.
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


def _neutral_only(table: dict[str, tuple[Any, ...]], value: Any, info: ValidationInfo) -> Any:
    allowed = table[info.field_name or ""]
    if any(_is(value, a) for a in allowed):
        return value
    values = " or ".join(json.dumps(a) for a in allowed)
    raise ValueError(f"not supported by Sluice; accepted only as {values}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None


class _Request(BaseModel):
    """Fields both endpoints share; unknown fields are a 400 (see openai_serving)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    # Choices; at most SLUICE_MAX_N (checked by the handler: a setting, not the schema)
    n: int | None = Field(None, ge=1)
    stop: Stop = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # vLLM's extensions (the openai client sends them in `extra_body`)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=16)
    # OpenAI's end-user id: the key its requests go to Kafka with, so a conversation meets the
    # worker that has it cached (api/affinity.py); the tenant still comes from the API key.
    user: str | None = Field(None, max_length=256)

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(
        cls, options: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("'stream_options' is only allowed when 'stream' is true")
        return options

    def stop_list(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # OpenAI's newer name for the system role; the model's template knows only `system`.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def to_wire(self) -> WireMessage:
        text = self.content
        if not isinstance(text, str):
            text = "".join(p.text for p in text)
        return WireMessage(role="system" if self.role == "developer" else self.role, content=text)


class ChatCompletionRequest(_Request):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessageIn] = Field(..., min_length=1)
    # OpenAI's newer name for max_tokens; either may be given (both: they must agree).
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: ResponseFormatBody | None = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    web_search_options: Any = None

    @field_validator(*CHAT_NEUTRAL)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral_only(CHAT_NEUTRAL, value, info)

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value

    def logprobs_param(self) -> int | None:
        """sampling.logprobs: the alternatives to return, or None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("max_completion_tokens")
    @classmethod
    def _agrees_with_max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if value is not None and other is not None and value != other:
            raise ValueError(f"differs from max_tokens={other}; give one of them")
        return value

    def max_tokens_param(self) -> tuple[str, int | None]:
        """The field the client used for the completion length, and its value."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class CompletionRequest(_Request):
    """`POST /v1/completions`: one text prompt (token-id and batched prompts are not served)."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: int | None = Field(None, ge=0, le=5)  # the alternatives at each token
    logit_bias: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None

    @field_validator(*COMPLETION_NEUTRAL)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral_only(COMPLETION_NEUTRAL, value, info)

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# --- Responses


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Response(BaseModel):
    id: str
    object: str  # each subclass's literal; declared here to keep OpenAI's key order
    created: int
    model: str
    # Sluice's extension: the worker's cost of this request (docs/COST.md). A top-level extra
    # field, which OpenAI clients keep (`model_extra`) where one in `usage` could break them.
    sluice_cost_usd: float | None = None


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo


# --- Streamed chunks (`data: {...}` SSE lines, then `data: [DONE]`)


class _Chunk(_Response):
    usage: UsageInfo | None = None

    @model_serializer(mode="wrap")
    def _optional_keys(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        data = handler(self)
        if data.get("sluice_cost_usd") is None:
            data.pop("sluice_cost_usd", None)
        # OpenAI: with include_usage every chunk has `usage` (null but on the last); else none.
        if data.get("usage") is None and not (info.context or {}).get("include_usage"):
            data.pop("usage", None)
        return data


class ChatDelta(BaseModel):
    """The first delta carries the role, later ones content, the last none (`{}`)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_keys_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(_Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


# --- Embeddings

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`: text, texts, or token ids of the embedding model's tokenizer."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, gt=0)
    user: str | None = Field(None, max_length=256)

    def inputs(self) -> list[str] | list[list[int]]:
        """One list of texts or one of token-id lists (an empty list is neither: a 400)."""
        given = self.input
        if isinstance(given, str):
            return [given]
        if given and isinstance(given[0], int):
            return [given]  # type: ignore[list-item]
        return given  # type: ignore[return-value]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    sluice_cost_usd: float  # the API's encode time at SLUICE_API_HOURLY_USD


# --- Files and batches (api/files.py, api/batches.py)


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["batch", "batch_output"]
    # Sluice's: whose it is (files are per tenant; another tenant gets a 404)
    sluice_tenant: str


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
    "cancelled",
]  # fmt: skip


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: BatchEndpoint
    completion_window: Literal["24h"]
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)


class BatchRequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: BatchEndpoint
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None
    sluice_tenant: str


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


# --- Models


class ModelWorker(BaseModel):
    worker_id: str
    engine: str
    in_flight: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sluice"
    # Sluice's extensions: the live workers serving it (from their heartbeats), or "api" for
    # the embedding model, which the API processes serve themselves.
    sluice_workers: list[ModelWorker]
    sluice_served_by: Literal["workers", "api"] = "workers"
    # Requests waiting in its pool's topic, as its live workers last reported it
    sluice_lag: int = 0
    # A LoRA adapter's base model, whose pool serves it (as vLLM lists LoRA modules)
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- Errors


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
