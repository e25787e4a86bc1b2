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

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
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
from api.idempotency import KEY_REUSED, Key
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
from api.serving import SSE_HEADERS, Build, GenerateHandler, HungUp, Relay, Validated
from api.streaming import Completion, Queued, Relaying, RequestFailed
from shared import metrics, pools
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
        self, body: ChatCompletionRequest, caller: Caller = ANONYMOUS,
        hung_up: HungUp | None = None, key: Key | None = None,
    ) -> Response:  # fmt: skip
        async def first(rid: str) -> Validated:
            return await self.chat_message(body, caller.tenant, rid)

        relays = await self._relays(body, caller, key, first)
        chunks = ChatChunks(f"chatcmpl-{relays[0].request_id}", body.model, n=len(relays))
        return await self._respond(relays, chunks, body, hung_up)

    async def completion(
        self, body: CompletionRequest, caller: Caller = ANONYMOUS,
        hung_up: HungUp | None = None, key: Key | None = None,
    ) -> Response:  # fmt: skip
        async def first(rid: str) -> Validated:
            return await self.completion_message(body, caller.tenant, rid)

        relays = await self._relays(body, caller, key, first)
        chunks = CompletionChunks(f"cmpl-{relays[0].request_id}", body.model, n=len(relays))
        return await self._respond(relays, chunks, body, hung_up)

    async def _relays(
        self, body: ChatCompletionRequest | CompletionRequest, caller: Caller, key: Key | None,
        first: Callable[[str], Awaitable[Validated]],
    ) -> list[Relay]:  # fmt: skip
        relays, _ = await self.generate.relays(caller, key, self._choices(body, first))
        return relays

    def _choices(
        self, body: ChatCompletionRequest | CompletionRequest,
        first: Callable[[str], Awaitable[Validated]],
    ) -> Build:  # fmt: skip
        """`n` choices are `n` requests on Kafka (choice 0 has the response's id, choice i
        `<id>-<i>`), each with its own seed when one was given: each streams, migrates and is
        cancelled on its own, as vLLM itself splits `n` into child requests."""
        n = body.n or 1
        if n > self.settings.max_n:
            most = self.settings.max_n
            raise OpenAIError(400, f"n={n}: at most {most} choices (SLUICE_MAX_N)", "n")

        async def build(rid: str) -> tuple[list[Validated], Any]:
            one = await first(rid)
            return [one, *(_choice(one, i) for i in range(1, n))], None

        return build

    async def _respond(
        self, relays: list[Relay], chunks: Chunks,
        body: ChatCompletionRequest | CompletionRequest, hung_up: HungUp | None,
    ) -> Response:  # fmt: skip
        if body.stream:
            return self._stream(relays, chunks, body.include_usage())
        # All choices, or the first failure (RequestFailed: see install_error_handlers).
        wholes = await asyncio.gather(
            *(self.generate.collect(r, hung_up) for r in relays), return_exceptions=True
        )
        for whole in wholes:
            if isinstance(whole, BaseException):
                raise whole
        done = [w for w in wholes if isinstance(w, Completion)]
        return _json(chunks.response(done), relays[0].request_id, _cost(w.done for w in done))

    async def chat_message(
        self, body: ChatCompletionRequest, tenant: str, request_id: str | None = None
    ) -> Validated:
        """The wire request of a chat body (also a Batch API line's), or a 4xx naming the
        param."""
        self._check_model(body.model)
        length_param, max_tokens = body.max_tokens_param()
        prompt: dict[str, Any] = {"messages": [m.to_wire() for m in body.messages]}
        if body.response_format is not None:
            prompt["response_format"] = body.response_format
        if body.logprobs_param() is not None:
            prompt["logprobs"] = body.logprobs_param()
        return await self._to_wire(body, prompt, length_param, max_tokens, tenant, request_id)

    async def completion_message(
        self, body: CompletionRequest, tenant: str, request_id: str | None = None
    ) -> Validated:
        self._check_model(body.model)
        prompt: dict[str, Any] = {"prompt": body.prompt_text()}
        if body.logprobs is not None:
            prompt["logprobs"] = body.logprobs
        return await self._to_wire(body, prompt, "max_tokens", body.max_tokens, tenant, request_id)

    async def models(self) -> ModelList:
        """The catalog's models, each with its pool's live workers and the requests waiting in
        its topic (a pool may sit at zero workers), then any model a live worker reports
        outside the catalog (a misconfiguration; listing it makes it visible)."""
        try:
            beats = await live_workers(self.redis, self.settings)
        except Exception as e:  # Redis down: still say what this API serves
            log.warning("listing models without worker heartbeats: %s", e)
            beats = []
        served: dict[str, list[ModelWorker]] = {m: [] for m in pools.names(self.settings)}
        lag: dict[str, int] = {}
        for b in sorted(beats, key=lambda b: b.worker_id):
            worker = ModelWorker(worker_id=b.worker_id, engine=b.engine, in_flight=b.in_flight)
            served.setdefault(b.model, []).append(worker)
            lag[b.model] = lag.get(b.model, 0) + b.lag
        cards = [
            ModelCard(id=m, created=self.started, sluice_workers=w, sluice_lag=lag.get(m, 0))
            for m, w in served.items()
        ]
        for name in pools.servable(self.settings):  # adapters: served by their base's pool
            base = pools.base_of(self.settings, name)
            if base != name:
                cards.append(ModelCard(id=name, created=self.started, parent=base,
                                       sluice_workers=served.get(base, []),
                                       sluice_lag=lag.get(base, 0)))  # fmt: skip
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
        if model not in pools.servable(self.settings):
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
        request_id: str | None,
    ) -> Validated:
        """Through /generate's body and checks, so both APIs validate alike."""
        given = {
            "model": body.model,
            "max_tokens": max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "stop": body.stop_list(),
            "seed": body.seed,
            "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty,
            "repetition_penalty": body.repetition_penalty,
            "stop_token_ids": body.stop_token_ids,
            "user": body.user or None,
        }
        sampling = {k: v for k, v in given.items() if v is not None}  # None: Sluice's default
        try:
            generate = GenerateBody(**prompt, **sampling)
        except ValidationError as e:
            raise RequestValidationError(_in_body(e.errors())) from e
        try:
            return await self.generate.to_message(generate, tenant, request_id)
        except RequestValidationError as e:
            raise RequestValidationError(_renamed(e.errors(), "max_tokens", length_param)) from e

    def _stream(
        self, relays: list[Relay], chunks: Chunks, include_usage: bool
    ) -> StreamingResponse:
        ended: set[int] = set()  # choices whose terminal event was relayed

        async def frames() -> AsyncIterator[bytes]:
            metrics.OPEN_STREAMS.inc()
            try:
                async for frame in sse_chunks(merged(relays, ended), chunks, include_usage):
                    yield frame
            finally:
                metrics.OPEN_STREAMS.dec()
                # A client that left before [DONE] cancels the choices still running.
                for i, relay in enumerate(relays):
                    self.generate.release(relay, finished=i in ended)

        headers = {**SSE_HEADERS, "X-Request-Id": relays[0].request_id}
        return StreamingResponse(frames(), media_type="text/event-stream", headers=headers)


def _choice(first: Validated, i: int) -> Validated:
    """Choice i of a request whose choice 0 is `first`."""
    m = first.message
    sampling = m.sampling
    if sampling.seed is not None:  # distinct samples, each reproducible (wrapped to int64)
        seed = (sampling.seed + i + 2**63) % 2**64 - 2**63
        sampling = sampling.model_copy(update={"seed": seed})
    update = {"request_id": f"{m.request_id}-{i}", "sampling": sampling}
    return first._replace(message=m.model_copy(update=update))


Choice = tuple[int, Relaying | RequestFailed]


async def merged(relays: list[Relay], ended: set[int]) -> AsyncIterator[Choice]:
    """The events of all choices as they come, tagged with the choice's index; a choice's
    failure (its deadline) is one of them. `ended` collects the choices that finished."""
    queue: asyncio.Queue[Choice | None] = asyncio.Queue()

    async def pump(i: int, relay: Relay) -> None:
        try:
            async for event in relay.events:
                await queue.put((i, event))
            ended.add(i)
        except RequestFailed as e:
            await queue.put((i, e))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(relays)]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


# --- Stream events -> OpenAI objects


def usage(dones: list[DoneEvent]) -> UsageInfo:
    """The prompt once (every choice has the same), the completions of all choices."""
    prompt = dones[0].usage.prompt_tokens if dones else 0
    completion = sum(d.usage.completion_tokens for d in dones)
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _cost(dones: Iterable[DoneEvent]) -> float | None:
    costs = [d.cost_usd for d in dones if d.cost_usd is not None]
    return sum(costs) if costs else None


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
    n: int = 1
    created: int = field(default_factory=lambda: int(time.time()))
    # Characters of text already in chunks, per choice (completions' logprobs count offsets)
    chars: dict[int, int] = field(default_factory=dict)

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "created": self.created}

    def opening(self) -> Iterable[BaseModel]:
        return ()

    @abstractmethod
    def text(self, text: str, tokens: list[Token], index: int) -> BaseModel: ...

    @abstractmethod
    def finish(self, done: DoneEvent, index: int) -> BaseModel: ...

    @abstractmethod
    def usage(self, dones: list[DoneEvent]) -> BaseModel: ...

    @abstractmethod
    def response(self, choices: list[Completion]) -> BaseModel: ...


class ChatChunks(Chunks):
    def opening(self) -> Iterable[BaseModel]:
        # OpenAI's first chunk carries the role; clients build the message from it.
        delta = ChatDelta(role="assistant", content="")
        choices = [ChatChunkChoice(index=i, delta=delta) for i in range(self.n)]
        return [ChatCompletionChunk(**self.head(), choices=choices)]

    def text(self, text: str, tokens: list[Token], index: int) -> ChatCompletionChunk:
        choice = ChatChunkChoice(
            index=index, delta=ChatDelta(content=text), logprobs=chat_logprobs(tokens)
        )
        return ChatCompletionChunk(**self.head(), choices=[choice])

    def finish(self, done: DoneEvent, index: int) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=done.finish_reason)
        return ChatCompletionChunk(**self.head(), choices=[choice], sluice_cost_usd=done.cost_usd)

    def usage(self, dones: list[DoneEvent]) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head(), choices=[], usage=usage(dones))

    def response(self, choices: list[Completion]) -> ChatCompletionResponse:
        out = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=c.text),
                finish_reason=c.done.finish_reason,
                logprobs=chat_logprobs(c.logprobs),
            )
            for i, c in enumerate(choices)
        ]
        dones = [c.done for c in choices]
        return ChatCompletionResponse(
            **self.head(), choices=out, usage=usage(dones), sluice_cost_usd=_cost(dones)
        )


class CompletionChunks(Chunks):
    def text(self, text: str, tokens: list[Token], index: int) -> CompletionChunk:
        choice = CompletionChoice(index=index, text=text, logprobs=self.logprobs(tokens, index))
        return CompletionChunk(**self.head(), choices=[choice])

    def logprobs(self, tokens: list[Token], index: int) -> CompletionLogprobs | None:
        """OpenAI's legacy shape; `text_offset` counts from the completion's start."""
        tokens = [t for t in tokens if t.logprob is not None]
        if not tokens:
            return None
        offsets = []
        for t in tokens:
            offsets.append(self.chars.get(index, 0))
            self.chars[index] = offsets[-1] + len(t.token or "")
        return CompletionLogprobs(
            tokens=[t.token or "" for t in tokens],
            token_logprobs=[t.logprob or 0.0 for t in tokens],
            top_logprobs=[{a.token: a.logprob for a in t.top_logprobs or []} for t in tokens],
            text_offset=offsets,
        )

    def finish(self, done: DoneEvent, index: int) -> CompletionChunk:
        choice = CompletionChoice(index=index, text="", finish_reason=done.finish_reason)
        return CompletionChunk(**self.head(), choices=[choice], sluice_cost_usd=done.cost_usd)

    def usage(self, dones: list[DoneEvent]) -> CompletionChunk:
        return CompletionChunk(**self.head(), choices=[], usage=usage(dones))

    def response(self, choices: list[Completion]) -> CompletionResponse:
        out = [
            CompletionChoice(
                index=i,
                text=c.text,
                finish_reason=c.done.finish_reason,
                logprobs=self.logprobs(c.logprobs, i),
            )
            for i, c in enumerate(choices)
        ]
        dones = [c.done for c in choices]
        return CompletionResponse(
            **self.head(), choices=out, usage=usage(dones), sluice_cost_usd=_cost(dones)
        )


async def sse_chunks(
    source: AsyncIterator[Choice], chunks: Chunks, include_usage: bool
) -> AsyncIterator[bytes]:
    """`data: {chunk}` frames, a finish chunk per choice, the usage chunk if asked, then
    `data: [DONE]`. A failure mid-stream is a `data: {"error": ...}` frame, which OpenAI
    clients raise."""
    context = {"include_usage": include_usage}

    def frame(obj: BaseModel) -> bytes:
        return b"data: " + obj.model_dump_json(context=context).encode() + b"\n\n"

    dones: list[DoneEvent] = []
    for chunk in chunks.opening():
        yield frame(chunk)
    async for index, event in source:
        if isinstance(event, Queued):  # a comment: the openai client parses events as chunks
            yield f": queued {event.waited_s:g} s, {event.backlog} waiting\n\n".encode()
        elif isinstance(event, TokensEvent):
            text = "".join(t.text for t in event.tokens)
            if text:  # one chunk per coalesced event, however many tokens it holds
                yield frame(chunks.text(text, event.tokens, index))
        elif isinstance(event, DoneEvent):
            dones.append(event)
            yield frame(chunks.finish(event, index))
        elif isinstance(event, RequestFailed):
            yield frame(OpenAIError(event.status, event.message).body)
        else:  # a refusal is the client's to fix (400); a failure the server's (502)
            yield frame(OpenAIError(400 if event.rejected else 502, event.message).body)
    if include_usage and dones:
        yield frame(chunks.usage(dones))
    yield DONE_FRAME


def _json(response: BaseModel, request_id: str, cost_usd: float | None) -> JSONResponse:
    headers = {"X-Request-Id": request_id}
    if cost_usd is not None:
        headers["X-Sluice-Cost-Usd"] = f"{cost_usd:.6g}"
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
    if loc and loc[0] in ("body", "header", "query", "path"):
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
    # An Idempotency-Key reused with another body is a 422, as on the native API.
    status = 422 if error["type"] == KEY_REUSED else 400
    return OpenAIError(status, message, loc[0] if loc else None)


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
