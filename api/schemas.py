"""HTTP request and response bodies of the API (the Kafka/Redis contract is shared/messages.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.messages import (
    DOC_ID_MAX,
    DOC_ID_PATTERN,
    FinishReason,
    JsonSchemaFormat,
    MetadataValue,
    PromptInput,
    ResponseFormat,
    SamplingOptions,
    StrictChatMessage,
    Timings,
    Token,
    Usage,
)

# What vLLM refuses would come back from the worker as a 502: an empty stop string, a seed
# beyond 64 bits. Refused here instead, naming the field.
StopString = Annotated[str, Field(min_length=1)]
Stop = StopString | Annotated[list[StopString], Field(max_length=4)] | None
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class JsonSchemaBody(JsonSchemaFormat):
    model_config = ConfigDict(extra="forbid")

    @field_validator("schema_")
    @classmethod
    def _is_a_json_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        # Checked here, against the metaschema it names (2020-12 by default), so a typo is a
        # 4xx now; what the worker's grammar compiler still cannot take ends in an error event.
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for

        try:
            validator_for(schema).check_schema(schema)
        except SchemaError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "the root"
            raise ValueError(f"not a JSON Schema (at {where}): {e.message}") from None
        return schema


class ResponseFormatBody(ResponseFormat):
    """`response_format` as a person writes it: OpenAI's shape, unknown fields refused."""

    model_config = ConfigDict(extra="forbid")

    json_schema: JsonSchemaBody | None = None


class GenerateBody(PromptInput, SamplingOptions):
    """`POST /generate`: OpenAI's field names; unknown fields are rejected, not ignored."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("messages", mode="before")
    @classmethod
    def _strict_messages(cls, messages: object) -> object:
        # Wire messages tolerate unknown fields; a body a person wrote must not.
        if isinstance(messages, list):
            return [
                StrictChatMessage.model_validate(m) if isinstance(m, dict) else m for m in messages
            ]
        return messages

    # One of the catalog's models (shared/pools.py; /v1/models lists them); None: the default
    model: str | None = Field(None, min_length=1, max_length=256)
    max_tokens: int | None = Field(None, gt=0)  # type: ignore[assignment]
    stop: Stop = None  # type: ignore[assignment]
    seed: Seed | None = None
    stream: bool = False
    response_format: ResponseFormatBody | None = None  # type: ignore[assignment]
    # Give up after this long (queued or running: finish_reason "timeout"); at most, and by
    # default, SLUICE_REQUEST_TIMEOUT_S.
    timeout_s: float | None = Field(None, gt=0)
    # The end user or session (OpenAI's `user`): its requests meet one worker, whose prefix
    # cache holds the conversation so far (api/affinity.py).
    user: str | None = Field(None, min_length=1, max_length=256)

    def sampling(self, default_max_tokens: int) -> SamplingOptions:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingOptions(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stop,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            response_format=self.response_format,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            stop_token_ids=self.stop_token_ids,
            logprobs=self.logprobs,
        )


class GenerateResponse(BaseModel):
    request_id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    cost_usd: float | None = None
    # With `logprobs`: each token, its log probability and the top alternatives
    logprobs: list[Token] | None = None
    # The worker that served it (of the model's pool)
    worker_id: str | None = None


# --- Documents and retrieval (docs/RAG.md)

DOC_ID = Field(None, min_length=1, max_length=DOC_ID_MAX, pattern=DOC_ID_PATTERN)
# The same rules for `/documents/{doc_id}`: an id no document can have is a 422, not a 500.
DocIdPath = Annotated[str, Path(min_length=1, max_length=DOC_ID_MAX, pattern=DOC_ID_PATTERN)]
FilterValue = MetadataValue | list[MetadataValue]
MAX_FILTER_FIELDS, MAX_FILTER_VALUES, MAX_FILTER_CHARS = 16, 100, 256


def _as_list(value: FilterValue) -> list[MetadataValue]:
    return value if isinstance(value, list) else [value]


class DocumentBody(BaseModel):
    """`POST /documents` as JSON; files go as multipart uploads instead."""

    model_config = ConfigDict(extra="forbid")

    doc_id: str | None = DOC_ID  # default: derived from the content, so a resend is a no-op
    text: str = Field(..., min_length=1)
    title: str | None = Field(None, max_length=1000)
    source: str = Field("", max_length=1000)
    content_type: Literal["text/plain", "text/markdown", "text/html"] = "text/plain"
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("must not be blank")
        return text


class DocumentAccepted(BaseModel):
    doc_id: str
    status: str


class RetrieveBody(BaseModel):
    """`POST /retrieve`: ranked chunks, no generation."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1, max_length=4000)
    top_k: int | None = Field(None, ge=1, le=50)  # default: SLUICE_RAG_TOP_K
    filters: dict[str, FilterValue] | None = None
    # hybrid = dense + BM25 fused by reciprocal rank; default from SLUICE_RAG_HYBRID
    mode: Literal["hybrid", "dense", "bm25"] | None = None
    mmr: bool = False  # diversify: drop passages that repeat better-ranked ones
    min_score: float | None = Field(None, ge=-1, le=1)  # on the dense cosine similarity

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("must not be blank")
        return query

    @field_validator("filters")
    @classmethod
    def _filters_bounded(cls, filters: dict[str, FilterValue] | None) -> dict | None:
        # Each value becomes a term of the store's filter expression: a 1 MiB filter made a
        # ~100k-term Milvus expression.
        if filters is None:
            return None
        if len(filters) > MAX_FILTER_FIELDS:
            raise ValueError(f"at most {MAX_FILTER_FIELDS} fields")
        values = [v for value in filters.values() for v in _as_list(value)]
        if len(values) > MAX_FILTER_VALUES:
            raise ValueError(f"at most {MAX_FILTER_VALUES} values in all")
        if any(len(k) > MAX_FILTER_CHARS for k in filters) or any(
            isinstance(v, str) and len(v) > MAX_FILTER_CHARS for v in values
        ):
            raise ValueError(f"names and values of at most {MAX_FILTER_CHARS} characters")
        return filters


class Source(BaseModel):
    n: int  # the passage number the answer cites as [n]
    doc_id: str
    chunk_id: str
    source: str
    title: str
    score: float
    snippet: str


class RetrieveResponse(BaseModel):
    results: list[Source]


class RagGenerateBody(RetrieveBody):
    """`POST /rag-generate`: retrieval fields plus /generate's sampling fields."""

    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Stop = None
    seed: Seed | None = None
    stream: bool = False


class RagGenerateResponse(GenerateResponse):
    sources: list[Source]
