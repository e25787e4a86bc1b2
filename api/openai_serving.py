"""Handlers of the OpenAI-compatible API (`/v1`).

They translate OpenAI's bodies (api/openai_protocol.py) into the wire `GenerationRequest` and send
it down the same path as /generate (validation, Kafka, a worker, Redis pub/sub): no shortcut to
the engine. The stream events come back as OpenAI JSON or `data:` SSE chunks. Errors on /v1 paths
take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`; other paths keep theirs.

Authentication is a dependency of the /v1 router (api/auth.py): the API key's tenant goes on
the wire message, and its rate limits apply as on /generate (a 429 here is OpenAI's
`rate_limit_error`, a 401 its `authentication_error`). `user` is accepted and not used.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis
from starlette.exceptions import HTTPException

from api.auth import ANONYMOUS, Caller
from api.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    ModelWorker,
    TokenLogprobOut,
    TopLogprobOut,
    UsageInfo,
)
from api.schemas import GenerateBody
from api.serving import SSE_HEADERS, GenerateHandler, HungUp, Validated
from api.streaming import Event, RequestFailed
from shared import metrics
from shared.messages import DoneEvent, Token, TokensEvent
from shared.redis import live_workers
from shared.settings import Settings

log = logging.getLogger(__name__)

V1_PREFIX = "/v1/"
DONE_FRAME = b"data: [DONE]\n\n"
# OpenAI's error types by status; every status >= 500 is a server_error.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


class OpenAIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(
            error=ErrorDetail(
                message=message,
                type=ERROR_TYPES.get(status, "server_error" if status >= 500 else ERROR_TYPES[400]),
                param=param,
                code=code,
            )
        )

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=headers)


class OpenAIHandler:
    def __init__(self, settings: Settings, generate: GenerateHandler, redis: Redis) -> None:
        self.settings = settings
        self.generate = generate
        self.redis = redis
        self.started = int(time.time())

    async def chat(
        self, body: ChatCompletionRequest, caller: Caller = ANONYMOUS, hung_up: HungUp | None = None
    ) -> Response:
        request = await self.chat_message(body, caller.tenant)
        rid = request.message.request_id
        chunks = ChatChunks(f"chatcmpl-{rid}", body.model, int(time.time()))
        if body.stream:
            return await self._stream(request, chunks, body.include_usage(), caller)
        # RequestFailed: see install_error_handlers
        whole = await self.generate.collect(request, caller, hung_up)
        return _json(chunks.response(whole.text, whole.done, whole.logprobs), whole.done)

    async def completion(
        self, body: CompletionRequest, caller: Caller = ANONYMOUS, hung_up: HungUp | None = None
    ) -> Response:
        request = await self.completion_message(body, caller.tenant)
        rid = request.message.request_id
        chunks = CompletionChunks(f"cmpl-{rid}", body.model, int(time.time()))
        if body.stream:
            return await self._stream(request, chunks, body.include_usage(), caller)
        whole = await self.generate.collect(request, caller, hung_up)
        return _json(chunks.response(whole.text, whole.done, whole.logprobs), whole.done)

    async def chat_message(self, body: ChatCompletionRequest, tenant: str) -> Validated:
        """The wire request of a chat body (also a Batch API line's), or a 4xx naming the
        param."""
        self._check_model(body.model)
        length_param, max_tokens = body.max_tokens_param()
        prompt: dict[str, Any] = {"messages": [m.to_wire() for m in body.messages]}
        if body.response_format is not None:
            prompt["response_format"] = body.response_format
        if body.logprobs_param() is not None:
            prompt["logprobs"] = body.logprobs_param()
        return await self._to_wire(body, prompt, length_param, max_tokens, tenant)

    async def completion_message(self, body: CompletionRequest, tenant: str) -> Validated:
        self._check_model(body.model)
        prompt: dict[str, Any] = {"prompt": body.prompt_text()}
        if body.logprobs is not None:
            prompt["logprobs"] = body.logprobs
        return await self._to_wire(body, prompt, "max_tokens", body.max_tokens, tenant)

    async def models(self) -> ModelList:
        """The served model, always, and any other model a live worker reports (a worker on the
        same topic with another model is a misconfiguration; listing it makes it visible)."""
        try:
            beats = await live_workers(self.redis, self.settings)
        except Exception as e:  # Redis down: still say what this API serves
            log.warning("listing models without worker heartbeats: %s", e)
            beats = []
        served: dict[str, list[ModelWorker]] = {self.settings.model: []}
        for b in sorted(beats, key=lambda b: b.worker_id):
            worker = ModelWorker(worker_id=b.worker_id, engine=b.engine, in_flight=b.in_flight)
            served.setdefault(b.model, []).append(worker)
        cards = [ModelCard(id=m, created=self.started, sluice_workers=w) for m, w in served.items()]
        cards.append(  # /v1/embeddings, served by this process (api/openai_embeddings.py)
            ModelCard(
                id=self.settings.embedding_model,
                created=self.started,
                sluice_workers=[],
                sluice_served_by="api",
            )
        )
        return ModelList(data=cards)

    def _check_model(self, model: str) -> None:
        # Workers share one topic, so a request cannot pick among models: only ours is served.
        if model != self.settings.model:
            raise OpenAIError(
                404, f"The model `{model}` does not exist.", "model", "model_not_found"
            )

    async def _to_wire(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        prompt: dict[str, Any],
        length_param: str,
        max_tokens: int | None,
        tenant: str,
    ) -> Validated:
        """Through /generate's body and checks, so both APIs validate alike."""
        given = {
            "max_tokens": max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "stop": body.stop_list(),
            "seed": body.seed,
            "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty,
            "repetition_penalty": body.repetition_penalty,
            "stop_token_ids": body.stop_token_ids,
        }
        sampling = {k: v for k, v in given.items() if v is not None}  # None: Sluice's default
        try:
            generate = GenerateBody(**prompt, **sampling)
        except ValidationError as e:
            raise RequestValidationError(_in_body(e.errors())) from e
        try:
            return await self.generate.to_message(generate, tenant)
        except RequestValidationError as e:
            raise RequestValidationError(_renamed(e.errors(), "max_tokens", length_param)) from e

    async def _stream(
        self, request: Validated, chunks: Chunks, include_usage: bool, caller: Caller
    ) -> StreamingResponse:
        relay = await self.generate.submit(request, caller)
        rid = request.message.request_id

        async def frames() -> AsyncIterator[bytes]:
            metrics.OPEN_STREAMS.inc()
            finished = False
            try:
                async for frame in sse_chunks(relay.events, chunks, include_usage):
                    yield frame
                finished = True
            finally:
                metrics.OPEN_STREAMS.dec()
                # A client that left before [DONE] cancels the request, as on /generate.
                self.generate.release(rid, relay, cancel=not finished)

        headers = {**SSE_HEADERS, "X-Request-Id": rid}
        return StreamingResponse(frames(), media_type="text/event-stream", headers=headers)


# --- Stream events -> OpenAI objects


def usage(done: DoneEvent) -> UsageInfo:
    u = done.usage
    return UsageInfo(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
    )


def chat_logprobs(tokens: list[Token]) -> ChatLogprobs | None:
    tokens = [t for t in tokens if t.logprob is not None]
    if not tokens:
        return None
    return ChatLogprobs(
        content=[
            TokenLogprobOut(
                token=t.token or "",
                logprob=t.logprob or 0.0,
                bytes=list((t.token or "").encode()),
                top_logprobs=[
                    TopLogprobOut(token=a.token, logprob=a.logprob, bytes=list(a.token.encode()))
                    for a in t.top_logprobs or []
                ],
            )
            for t in tokens
        ]
    )


@dataclass
class Chunks(ABC):
    """One response's id, model and creation time, and the objects built from its events."""

    id: str
    model: str
    created: int
    chars: int = 0  # of text already in chunks (completions' logprobs count offsets)

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "created": self.created}

    def opening(self) -> Iterable[BaseModel]:
        return ()

    @abstractmethod
    def text(self, text: str, tokens: list[Token]) -> BaseModel: ...

    @abstractmethod
    def finish(self, done: DoneEvent) -> BaseModel: ...

    @abstractmethod
    def usage(self, done: DoneEvent) -> BaseModel: ...


class ChatChunks(Chunks):
    def opening(self) -> Iterable[BaseModel]:
        # OpenAI's first chunk carries the role; clients build the message from it.
        delta = ChatDelta(role="assistant", content="")
        return [ChatCompletionChunk(**self.head(), choices=[ChatChunkChoice(delta=delta)])]

    def text(self, text: str, tokens: list[Token]) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=ChatDelta(content=text), logprobs=chat_logprobs(tokens))
        return ChatCompletionChunk(**self.head(), choices=[choice])

    def finish(self, done: DoneEvent) -> ChatCompletionChunk:
        choice = ChatChunkChoice(delta=ChatDelta(), finish_reason=done.finish_reason)
        return ChatCompletionChunk(**self.head(), choices=[choice], sluice_cost_usd=done.cost_usd)

    def usage(self, done: DoneEvent) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head(), choices=[], usage=usage(done))

    def response(self, text: str, done: DoneEvent, tokens: list[Token]) -> ChatCompletionResponse:
        choice = ChatChoice(
            message=AssistantMessage(content=text), finish_reason=done.finish_reason,
            logprobs=chat_logprobs(tokens),
        )  # fmt: skip
        return ChatCompletionResponse(
            **self.head(), choices=[choice], usage=usage(done), sluice_cost_usd=done.cost_usd
        )


class CompletionChunks(Chunks):
    def text(self, text: str, tokens: list[Token]) -> CompletionChunk:
        choice = CompletionChoice(text=text, logprobs=self.logprobs(tokens))
        return CompletionChunk(**self.head(), choices=[choice])

    def logprobs(self, tokens: list[Token]) -> CompletionLogprobs | None:
        """OpenAI's legacy shape; `text_offset` counts from the completion's start."""
        tokens = [t for t in tokens if t.logprob is not None]
        if not tokens:
            return None
        offsets = []
        for t in tokens:
            offsets.append(self.chars)
            self.chars += len(t.token or "")
        return CompletionLogprobs(
            tokens=[t.token or "" for t in tokens],
            token_logprobs=[t.logprob or 0.0 for t in tokens],
            top_logprobs=[{a.token: a.logprob for a in t.top_logprobs or []} for t in tokens],
            text_offset=offsets,
        )

    def finish(self, done: DoneEvent) -> CompletionChunk:
        choice = CompletionChoice(text="", finish_reason=done.finish_reason)
        return CompletionChunk(**self.head(), choices=[choice], sluice_cost_usd=done.cost_usd)

    def usage(self, done: DoneEvent) -> CompletionChunk:
        return CompletionChunk(**self.head(), choices=[], usage=usage(done))

    def response(self, text: str, done: DoneEvent, tokens: list[Token]) -> CompletionResponse:
        choice = CompletionChoice(
            text=text, finish_reason=done.finish_reason, logprobs=self.logprobs(tokens)
        )
        return CompletionResponse(
            **self.head(), choices=[choice], usage=usage(done), sluice_cost_usd=done.cost_usd
        )


async def sse_chunks(
    source: AsyncIterator[Event], chunks: Chunks, include_usage: bool
) -> AsyncIterator[bytes]:
    """`data: {chunk}` frames, a finish chunk, the usage chunk if asked, then `data: [DONE]`.
    A failure mid-stream is a `data: {"error": ...}` frame, which OpenAI clients raise."""
    context = {"include_usage": include_usage}

    def frame(obj: BaseModel) -> bytes:
        return b"data: " + obj.model_dump_json(context=context).encode() + b"\n\n"

    try:
        for chunk in chunks.opening():
            yield frame(chunk)
        async for event in source:
            if isinstance(event, TokensEvent):
                text = "".join(t.text for t in event.tokens)
                if text:  # one chunk per coalesced event, however many tokens it holds
                    yield frame(chunks.text(text, event.tokens))
            elif isinstance(event, DoneEvent):
                yield frame(chunks.finish(event))
                if include_usage:
                    yield frame(chunks.usage(event))
            else:  # a refusal is the client's to fix (400); a failure the server's (502)
                yield frame(OpenAIError(400 if event.rejected else 502, event.message).body)
    except RequestFailed as e:
        yield frame(OpenAIError(e.status, e.message).body)
    yield DONE_FRAME


def _json(response: BaseModel, done: DoneEvent) -> JSONResponse:
    headers = {"X-Request-Id": done.request_id}
    if done.cost_usd is not None:
        headers["X-Sluice-Cost-Usd"] = f"{done.cost_usd:.6g}"
    return JSONResponse(response.model_dump(mode="json"), headers=headers)


# --- Errors in OpenAI's shape


def _in_body(errors: Iterable[Any]) -> list[dict[str, Any]]:
    return [{**e, "loc": ("body", *e["loc"])} for e in errors]


def _renamed(errors: Iterable[Any], old: str, new: str) -> list[dict[str, Any]]:
    return [{**e, "loc": tuple(new if p == old else p for p in e["loc"])} for e in errors]


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "constrained-str"}


def from_validation(exc: RequestValidationError) -> OpenAIError:
    """A 400 naming the (top-level) field of the first error, as OpenAI reports one."""
    error = exc.errors()[0]
    # Union members show up in the location as their type ("str", "list[str]"): not fields.
    loc = [str(p) for p in error["loc"] if str(p) not in _UNION_TAGS and "[" not in str(p)]
    if loc and loc[0] == "body":
        loc = loc[1:]
    if error["type"] == "json_invalid":
        return OpenAIError(400, "We could not parse the JSON body of your request.")
    path = ".".join(loc)
    if error["type"] == "missing":
        message = f"Missing required parameter: '{path}'." if path else "Missing request body."
    elif error["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {path}"
    else:
        message = f"Invalid value for '{path}': {error['msg'].removeprefix('Value error, ')}"
    return OpenAIError(400, message, loc[0] if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    """Errors on /v1 paths in OpenAI's shape; every other path keeps FastAPI's."""

    def v1(request: Request) -> bool:
        return request.url.path.startswith(V1_PREFIX)

    async def on_openai(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OpenAIError)
        return exc.response()

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        if v1(request):
            return from_validation(exc).response()
        return await request_validation_exception_handler(request, exc)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if v1(request):
            return OpenAIError(exc.status_code, str(exc.detail)).response(exc.headers)
        return await http_exception_handler(request, exc)

    async def on_failed(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestFailed)
        if v1(request):
            return OpenAIError(exc.status, exc.message).response()
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    app.add_exception_handler(OpenAIError, on_openai)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(RequestFailed, on_failed)
