"""The wire contract between the API and the workers, defined once.

- `GenerationRequest`: the Kafka message on `sluice.requests` (JSON, keyed by request id).
- `TokensEvent`, `DoneEvent`, `ErrorEvent`: stream events a worker publishes on the request's
  Redis channel; the API relays them as SSE.
- `Heartbeat`: what each worker writes to Redis so the API knows someone is serving.
- `Cancel`: published on the Redis cancel channel; the worker holding the request aborts it.
- `BatchResult`: what a worker writes to `sluice.batch.results` for a request that came from
  `sluice.batch.requests` (keyed by request id).
- `BatchEmbedding`: an embeddings line of a Batch API batch, on `sluice.batch.embeddings`.

How the wire evolves (docs/ARCHITECTURE.md, "Evolving the wire"), so that a rolling update
never has an old reader dead-letter a new writer's message:
- Within a version every added field is optional, with a default that keeps the old meaning.
- Readers ignore fields they do not know, at every level: an informational addition passes
  old readers unchanged, whichever side is upgraded first.
- A field that changes what the answer must be (structured output, penalties, logprobs) is
  sent together with its feature's name in `requires`; a reader that does not know a
  required feature refuses the message naming it (the worker dead-letters it and the client
  gets an error) instead of silently answering something else. Upgrade readers (workers)
  first, then let writers (the API) use the feature.
- A change that cannot be made additive is a new version `v`; readers accept both versions
  for one release before writers switch. A reader refuses versions it does not know.

HTTP bodies and batch lines are written by people: there a typo must be an error, so those
models forbid unknown fields themselves (`StrictChatMessage`, api/schemas.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    field_validator,
    model_serializer,
    model_validator,
)

SCHEMA_VERSION = 1

# abort: cancelled (client gone or DELETE /requests/{id}); timeout: its deadline passed
FinishReason = Literal["stop", "length", "abort", "timeout", "error"]


# Features a GenerationRequest may require that this code honours (see the module docstring).
STRUCTURED_OUTPUT = "structured_output"  # sampling.response_format other than text
PENALTIES = "penalties"  # presence, frequency or repetition penalty other than neutral
STOP_TOKEN_IDS = "stop_token_ids"
LOGPROBS = "logprobs"
ADAPTER = "adapter"  # a LoRA adapter: a worker that ignored it would answer as the base model
KNOWN_FEATURES: frozenset[str] = frozenset(
    {STRUCTURED_OUTPUT, PENALTIES, STOP_TOKEN_IDS, LOGPROBS, ADAPTER}
)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")  # tolerated additions: the evolution rule


class ChatMessage(_Wire):
    role: Literal["system", "user", "assistant"]
    content: str


class StrictChatMessage(ChatMessage):
    """A chat message in a body a person wrote: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


class JsonSchemaFormat(_Wire):
    """OpenAI's `response_format.json_schema`: the schema the output must validate against."""

    model_config = ConfigDict(validate_by_name=True, serialize_by_alias=True)

    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    # "schema" would shadow a BaseModel attribute: an alias, the same on the wire and in bodies
    schema_: dict[str, Any] = Field(..., alias="schema")
    strict: bool | None = None


class ResponseFormat(_Wire):
    """OpenAI's `response_format`: free text, any JSON object, or JSON valid for a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_needed(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self

    @property
    def constrained(self) -> bool:
        return self.type != "text"


class SamplingOptions(_Wire):
    """OpenAI's sampling fields; ranges as OpenAI documents them."""

    max_tokens: int = Field(..., gt=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: int | None = None
    # vLLM's extension: generate exactly max_tokens (benchmarks need fixed output lengths).
    ignore_eos: bool = False
    # Constrained decoding; a request that sets it requires STRUCTURED_OUTPUT (module doc).
    response_format: ResponseFormat | None = None
    # OpenAI's penalties and vLLM's repetition penalty (neutral: 0, 0, 1); require PENALTIES.
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    # vLLM's: token ids that end the completion like EOS; requires STOP_TOKEN_IDS.
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=16)
    # Each token's log probability and this many most likely alternatives; requires LOGPROBS.
    logprobs: int | None = Field(None, ge=0, le=20)

    def structured(self) -> ResponseFormat | None:
        rf = self.response_format
        return rf if rf is not None and rf.constrained else None

    def penalized(self) -> bool:
        return (self.presence_penalty, self.frequency_penalty, self.repetition_penalty) != (
            0.0, 0.0, 1.0,
        )  # fmt: skip

    def features(self) -> list[str]:
        """What a worker must honour to answer these options as asked (module doc)."""
        needed = [
            (STRUCTURED_OUTPUT, self.structured() is not None),
            (PENALTIES, self.penalized()),
            (STOP_TOKEN_IDS, bool(self.stop_token_ids)),
            (LOGPROBS, self.logprobs is not None),
        ]
        return [name for name, used in needed if used]


class PromptInput(_Wire):
    """Exactly one of `prompt` (raw text) or `messages` (rendered with the chat template)."""

    prompt: str | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str | None) -> str | None:
        if prompt is not None and not prompt.strip():
            raise ValueError("must not be blank")
        return prompt

    @model_validator(mode="after")
    def _one_input(self) -> PromptInput:
        if self.prompt is not None and self.messages is not None:
            raise ValueError("give either 'prompt' or 'messages', not both")
        if self.prompt is None and self.messages is None:
            raise ValueError("one of 'prompt' or 'messages' is required")
        return self


class GenerationRequest(PromptInput):
    v: Literal[1] = SCHEMA_VERSION
    request_id: str = Field(..., min_length=1, max_length=128)
    sampling: SamplingOptions
    # Unix time (s) at which the API produced the request; workers derive queue time from it.
    enqueued_at: float
    # Unix time after which nobody wants the result: a worker drops it unrun (finish_reason
    # "timeout") or stops it there. None: no deadline.
    deadline: float | None = None
    # Who pays: the API key's tenant (cost attribution, rate limits). None: "default".
    tenant: str | None = Field(None, max_length=128)
    # Batch submitters' own id for the request, echoed in its BatchResult.
    correlation: str | None = Field(None, max_length=256)
    # Features this request needs its worker to honour (KNOWN_FEATURES); see the module doc.
    requires: list[str] = Field(default_factory=list)
    # The catalog's model it is for (shared/pools.py); a worker of another pool dead-letters
    # it. None: whatever the topic's pool serves.
    model: str | None = Field(None, max_length=256)
    # A LoRA adapter of `model` to run it with (the catalog's `adapter_of`); requires ADAPTER.
    adapter: str | None = Field(None, max_length=256)
    # Keep the request's events this long after it ends (an Idempotency-Key's window: a retry
    # replays them). None: as long as a resume needs them. A worker that predates the field
    # keeps them that long only, and a late retry then finds no result (404), never a rerun.
    retain_s: int | None = Field(None, ge=0, le=7 * 86400)

    @field_validator("requires")
    @classmethod
    def _known_features(cls, requires: list[str]) -> list[str]:
        unknown = sorted(set(requires) - KNOWN_FEATURES)
        if unknown:
            raise ValueError(f"needs features this worker does not have: {', '.join(unknown)}")
        return requires


class TopLogprob(_Wire):
    token: str
    logprob: float


class Token(_Wire):
    index: int = Field(..., ge=0)
    text: str
    # Characters of the completion before this token's text. A request redelivered after a
    # worker crash is generated again from the start, possibly grouped into different deltas;
    # index and offset together let the API relay each character exactly once.
    offset: int | None = None
    # With sampling.logprobs: this token's own text (`text` may hold a group's), its log
    # probability, and the most likely alternatives at its position.
    token: str | None = None
    logprob: float | None = None
    top_logprobs: list[TopLogprob] | None = None

    @model_serializer(mode="wrap")
    def _logprobs_only_when_asked(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.logprob is None:  # most requests: the events stay as small as before
            for key in ("token", "logprob", "top_logprobs"):
                data.pop(key, None)
        return data


class Usage(_Wire):
    prompt_tokens: int
    completion_tokens: int


class Timings(_Wire):
    queue_ms: float
    ttft_ms: float
    e2e_ms: float


class TokensEvent(_Wire):
    """One or more consecutive tokens; workers coalesce deltas to spare Redis round trips."""

    v: Literal[1] = SCHEMA_VERSION
    type: Literal["tokens"] = "tokens"
    tokens: list[Token]
    # Unix time the worker published the event, for the delivery-latency metric (the API and
    # workers should share a clock: NTP).
    published_at: float | None = None


class DoneEvent(_Wire):
    v: Literal[1] = SCHEMA_VERSION
    type: Literal["done"] = "done"
    request_id: str
    finish_reason: FinishReason
    usage: Usage
    # Measured by the worker from `enqueued_at`; the API replaces ttft/e2e with its own clock.
    timings: Timings
    # Engine time attributed to this request by token share, at the instance price
    cost_usd: float | None = None
    # The worker whose engine finished it (with a model pool: one of that pool's workers)
    worker_id: str | None = None


class ErrorEvent(_Wire):
    v: Literal[1] = SCHEMA_VERSION
    type: Literal["error"] = "error"
    request_id: str
    message: str
    # The engine refused the request as it is (e.g. a schema its grammar compiler cannot
    # build): the client's to fix, a 4xx; otherwise the engine failed on it, a 5xx.
    rejected: bool = False


StreamEvent = Annotated[TokensEvent | DoneEvent | ErrorEvent, Field(discriminator="type")]
stream_event_adapter: TypeAdapter[TokensEvent | DoneEvent | ErrorEvent] = TypeAdapter(StreamEvent)


class Cancel(_Wire):
    v: Literal[1] = SCHEMA_VERSION
    request_id: str
    reason: Literal["client_disconnected", "cancelled"] = "cancelled"


class BatchResult(_Wire):
    """The outcome of one batch request: its text, or the error that stopped it."""

    v: Literal[1] = SCHEMA_VERSION
    request_id: str
    correlation: str | None = None
    text: str = ""
    finish_reason: FinishReason
    usage: Usage
    cost_usd: float | None = None
    error: str | None = None
    finished_at: float
    # With sampling.logprobs: each token of `text` with its log probability and the top
    # alternatives, as in the stream events
    logprobs: list[Token] | None = None


class BatchEmbedding(_Wire):
    """One `/v1/embeddings` line of a Batch API batch, on `sluice.batch.embeddings` (keyed
    `<batch id>-<line>`): the API validated `body` (an OpenAI embeddings body) at creation;
    the API process that reads it embeds it and records the line (api/batch_embedder.py)."""

    v: Literal[1] = SCHEMA_VERSION
    batch_id: str = Field(..., min_length=1, max_length=128)
    line: int = Field(..., ge=0)
    custom_id: str = Field(..., min_length=1, max_length=256)
    tenant: str = Field(..., max_length=128)
    body: dict[str, Any]


class Heartbeat(_Wire):
    v: Literal[1] = SCHEMA_VERSION
    worker_id: str
    engine: str
    model: str
    in_flight: int
    ts: float
    # Requests waiting in this worker's partitions of the requests topic: the API's
    # backpressure sums it over workers.
    lag: int = 0
    # False for a batch-only worker: it adds nothing to the capacity interactive requests see.
    interactive: bool = True
    # The requests topic's partitions its consumer reads now (none while its group
    # rebalances, or while it is full, restarts its engine or drains): the ones no live
    # worker lists are read by the others with room (workers/rescue.py).
    partitions: list[int] = Field(default_factory=list)
    # The requests topic it reads, so its model pool's (shared/pools.py); None: a worker from
    # before pools, which served the default one.
    topic: str | None = None
    # Its engine's KV cache in use (0-1) and tokens generated per second over the last
    # minute, from vLLM's own metrics (None on an engine without them): `sluice status`.
    kv_cache_usage: float | None = None
    tokens_per_s: float | None = None

    def serves(self, requests_topic: str, default_topic: str) -> bool:
        """Whether it is a worker of the pool reading `requests_topic`."""
        return (self.topic or default_topic) == requests_topic


# --- Ingestion: the message on `sluice.ingest` (keyed by doc_id, so one document's versions
# stay in order on one partition). Producers may post it straight to the topic.

ContentType = Literal["text/plain", "text/markdown", "text/html", "application/pdf"]
# A document id: also used in chunk ids and Milvus filter strings, so a conservative alphabet.
DOC_ID_PATTERN = r"^[A-Za-z0-9._:/@-]+$"
DOC_ID_MAX = 200
MetadataValue = str | int | float | bool


class IngestDocument(_Wire):
    """Add or replace a document (`upsert`), or remove all of its chunks (`delete`).

    Text types carry `text`; PDFs carry their bytes base64-encoded in `data_b64`.
    """

    v: Literal[1] = SCHEMA_VERSION
    action: Literal["upsert", "delete"] = "upsert"
    doc_id: str = Field(..., min_length=1, max_length=DOC_ID_MAX, pattern=DOC_ID_PATTERN)
    source: str = Field("", max_length=1000)  # file name or URL, shown with citations
    title: str | None = Field(None, max_length=1000)
    content_type: ContentType = "text/plain"
    text: str | None = None
    data_b64: str | None = None
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    enqueued_at: float

    @model_validator(mode="after")
    def _body_matches_action(self) -> IngestDocument:
        if self.action == "delete":
            return self
        if self.content_type == "application/pdf":
            if not self.data_b64:
                raise ValueError("a PDF needs 'data_b64'")
        elif self.text is None:
            raise ValueError(f"{self.content_type} needs 'text'")
        return self
