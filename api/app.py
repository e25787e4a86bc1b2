"""The HTTP API: routes only. It never runs a model; requests go to Kafka, tokens come back
over Redis (see api/serving.py and api/streaming.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Form, Header, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from api import batch_collector, batch_embedder
from api.auth import AdminDep, Authenticator, Caller, CallerDep, OwnedRequestId, require_caller
from api.batches import Batches
from api.documents import DocumentsHandler
from api.errors import invalid_field
from api.files import DirectoryStore, Files
from api.health import readiness
from api.idempotency import Key
from api.middleware import BodyLimit, RequestMetrics
from api.openai_embeddings import EmbeddingsHandler
from api.openai_protocol import (
    BatchCreate,
    BatchList,
    BatchObject,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    FileDeleted,
    FileList,
    FileObject,
    ModelList,
)
from api.openai_serving import OpenAIError, OpenAIHandler, install_error_handlers
from api.rag import PromptTemplate, RagHandler
from api.schemas import (
    DocIdPath,
    DocumentAccepted,
    GenerateBody,
    GenerateResponse,
    RagGenerateBody,
    RagGenerateResponse,
    RetrieveBody,
    RetrieveResponse,
)
from api.serving import GenerateHandler
from api.streaming import StreamHub
from shared import cost, kafka, ledger, metrics, pools
from shared import redis as sredis
from shared.documents import DocumentStatus
from shared.embeddings import Embedder
from shared.models import model_path
from shared.settings import Settings
from shared.tracing import Tracer

# Stripe's limit on the key's length; Last-Event-ID as EventSource sends it on reconnect.
IdempotencyKey = Annotated[str | None, Header(max_length=255)]
LastEventId = Annotated[int, Header(ge=-1)]

# Ledger windows are cached as long as a worker waits between flushes (workers/usage.py).
LEDGER_CACHE_S = 5.0
LEDGER_FLUSH_S = 5.0


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path(settings))
        for model in pools.names(settings):  # a pool at zero workers still takes requests
            await kafka.ensure_topics(pools.pool_settings(settings, model))
        metrics.start_model_series(pools.servable(settings))
        redis = sredis.connect(settings)
        producer = kafka.make_producer(settings)
        await producer.start()
        hub = StreamHub(redis, settings)
        await hub.start()
        tracer = Tracer(settings, redis, "sluice-api")
        traces = asyncio.create_task(tracer.run())
        app.state.redis, app.state.producer = redis, producer
        app.state.auth = Authenticator(settings, redis)
        app.state.generate = GenerateHandler(settings, tokenizer, producer, hub, tracer)
        app.state.openai = OpenAIHandler(settings, app.state.generate, redis)
        app.state.documents = DocumentsHandler(settings, producer, redis)
        app.state.ledger = ledger.Reader(redis, settings, cache_s=LEDGER_CACHE_S)
        embedder = await asyncio.to_thread(Embedder.load, settings)
        template = PromptTemplate.load(settings.rag_prompt_template)
        app.state.rag = RagHandler(settings, app.state.generate, embedder, template)
        usage = ledger.Ledger(redis, settings)  # what this process serves itself: embeddings
        app.state.embeddings = EmbeddingsHandler(
            settings, embedder, app.state.generate.limiter, usage
        )
        app.state.files = Files(settings, redis, DirectoryStore(settings.files_dir))
        app.state.batches = Batches(
            settings, redis, producer, app.state.files, app.state.openai, app.state.embeddings
        )
        topics = asyncio.create_task(kafka.watch_topics(settings, producer))
        flushing = asyncio.create_task(ledger.flush_every(usage, LEDGER_FLUSH_S))
        collecting = asyncio.create_task(batch_collector.run(settings, app.state.batches))
        embedding = asyncio.create_task(
            batch_embedder.run(settings, app.state.batches, app.state.embeddings, producer)
        )
        try:
            yield
        finally:
            topics.cancel()
            collecting.cancel()
            embedding.cancel()
            flushing.cancel()
            with contextlib.suppress(Exception):
                await usage.flush()
            traces.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await traces  # its last hops reach Redis
            tracer.shutdown()
            app.state.rag.close()
            await hub.stop()
            await producer.stop()
            await redis.aclose()

    app = FastAPI(title="Sluice", version="0.1.0", lifespan=lifespan)
    app.add_middleware(
        BodyLimit, settings.max_body_bytes, settings.max_document_bytes, settings.max_file_bytes
    )
    app.add_middleware(RequestMetrics)  # outermost: it counts BodyLimit's 413s too
    install_error_handlers(app)  # OpenAI's error shape on /v1 paths only

    def idempotency(caller: Caller, header: str | None, route: str, body: BaseModel) -> Key | None:
        return app.state.generate.idempotency.key(caller, header, route, body)

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(
        body: GenerateBody,
        request: Request,
        caller: CallerDep,
        idempotency_key: IdempotencyKey = None,
        last_event_id: LastEventId = -1,
    ) -> Response | GenerateResponse:
        """With an `Idempotency-Key`, a retry attaches to the first request (api/idempotency.py);
        a streaming one replays after `Last-Event-ID`."""
        handler: GenerateHandler = request.app.state.generate
        key = idempotency(caller, idempotency_key, "/generate", body)
        if body.stream:
            return await handler.stream(body, caller, key, last_event_id)
        return await handler.complete(body, caller, request.is_disconnected, key)

    @app.delete("/requests/{request_id}", status_code=202)
    async def cancel_request(request_id: OwnedRequestId, request: Request) -> dict[str, str]:
        """Cancel a queued or running request; it ends with finish_reason "abort"."""
        await request.app.state.generate.cancel(request_id)
        return {"request_id": request_id, "status": "cancelling"}

    @app.get("/requests/{request_id}/stream")
    async def resume_stream(
        request_id: OwnedRequestId, request: Request, last_event_id: LastEventId = -1
    ) -> Response:
        """Resume an SSE stream after the token whose id the client saw last (`Last-Event-ID`,
        as EventSource sends it on reconnect); -1 or absent: from the start."""
        return await request.app.state.generate.resume(request_id, last_event_id)

    # OpenAI-compatible (api/openai_serving.py): the same Kafka path as /generate. Auth is a
    # dependency of the router, so every /v1 route has it (FastAPI resolves it once a request).
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_caller)])

    @v1.post("/chat/completions")
    async def chat_completions(
        body: ChatCompletionRequest,
        request: Request,
        caller: CallerDep,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        key = idempotency(caller, idempotency_key, "/v1/chat/completions", body)
        return await request.app.state.openai.chat(body, caller, request.is_disconnected, key)

    @v1.post("/completions")
    async def completions(
        body: CompletionRequest,
        request: Request,
        caller: CallerDep,
        idempotency_key: IdempotencyKey = None,
    ) -> Response:
        key = idempotency(caller, idempotency_key, "/v1/completions", body)
        return await request.app.state.openai.completion(body, caller, request.is_disconnected, key)

    @v1.post("/embeddings", response_model=EmbeddingResponse)
    async def embeddings(body: EmbeddingRequest, request: Request, caller: CallerDep) -> Response:
        return await request.app.state.embeddings.create(body, caller)

    # The Batch API (api/files.py, api/batches.py): files and batches are the key's tenant's.
    @v1.post("/files", response_model=FileObject)
    async def upload_file(
        request: Request, caller: CallerDep, file: UploadFile, purpose: Annotated[str, Form()]
    ) -> FileObject:
        if purpose != "batch":
            raise OpenAIError(400, f"purpose {purpose!r}: only 'batch' is served", "purpose")
        data = await file.read()
        name = file.filename or "upload.jsonl"
        return await request.app.state.files.create(caller.tenant, name, data, "batch")

    @v1.get("/files", response_model=FileList)
    async def list_files(
        request: Request,
        caller: CallerDep,
        purpose: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    ) -> FileList:
        return await request.app.state.files.list(caller.tenant, purpose, limit)

    @v1.get("/files/{file_id}", response_model=FileObject)
    async def get_file(file_id: str, request: Request, caller: CallerDep) -> FileObject:
        return await request.app.state.files.get(file_id, caller.tenant)

    @v1.get("/files/{file_id}/content")
    async def file_content(file_id: str, request: Request, caller: CallerDep) -> Response:
        data = await request.app.state.files.content(file_id, caller.tenant)
        return Response(data, media_type="application/octet-stream")

    @v1.delete("/files/{file_id}", response_model=FileDeleted)
    async def delete_file(file_id: str, request: Request, caller: CallerDep) -> FileDeleted:
        return await request.app.state.files.delete(file_id, caller.tenant)

    @v1.post("/batches", response_model=BatchObject)
    async def create_batch(
        body: BatchCreate,
        request: Request,
        caller: CallerDep,
        idempotency_key: IdempotencyKey = None,
    ) -> BatchObject:
        key = idempotency(caller, idempotency_key, "/v1/batches", body)
        return await request.app.state.batches.create(body, caller, key)

    @v1.get("/batches", response_model=BatchList)
    async def list_batches(
        request: Request,
        caller: CallerDep,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> BatchList:
        return await request.app.state.batches.list(caller.tenant, after, limit)

    @v1.get("/batches/{batch_id}", response_model=BatchObject)
    async def get_batch(batch_id: str, request: Request, caller: CallerDep) -> BatchObject:
        return await request.app.state.batches.get(batch_id, caller.tenant)

    @v1.post("/batches/{batch_id}/cancel", response_model=BatchObject)
    async def cancel_batch(batch_id: str, request: Request, caller: CallerDep) -> BatchObject:
        return await request.app.state.batches.cancel(batch_id, caller.tenant)

    @v1.get("/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        return await request.app.state.openai.models()

    app.include_router(v1)

    @app.post("/rag-generate", response_model=RagGenerateResponse)
    async def rag_generate(
        body: RagGenerateBody,
        request: Request,
        caller: CallerDep,
        idempotency_key: IdempotencyKey = None,
        last_event_id: LastEventId = -1,
    ) -> Response | RagGenerateResponse:
        key = idempotency(caller, idempotency_key, "/rag-generate", body)
        rag = request.app.state.rag
        return await rag.answer(body, caller, request.is_disconnected, key, last_event_id)

    @app.post("/retrieve", response_model=RetrieveResponse)
    async def retrieve(body: RetrieveBody, request: Request, caller: CallerDep) -> RetrieveResponse:
        return await request.app.state.rag.ranked(body, caller)

    @app.post("/documents", status_code=202, response_model=DocumentAccepted)
    async def add_document(request: Request, _: AdminDep) -> DocumentAccepted:
        """JSON (`DocumentBody`) or a multipart upload: `file`, optional `doc_id`, `title`,
        `metadata` (a JSON object)."""
        return await request.app.state.documents.add(request)

    @app.get("/documents/{doc_id:path}", response_model=DocumentStatus)
    async def document_status(doc_id: DocIdPath, request: Request, _: CallerDep) -> DocumentStatus:
        return await request.app.state.documents.status(doc_id)

    @app.delete("/documents/{doc_id:path}", status_code=202, response_model=DocumentAccepted)
    async def delete_document(doc_id: DocIdPath, request: Request, _: AdminDep) -> DocumentAccepted:
        return await request.app.state.documents.delete(doc_id)

    @app.get("/cost", response_model=cost.CostReport)
    async def cost_report(request: Request, _: AdminDep, window: str = "1h") -> cost.CostReport:
        """Cost over the last `window` (15m, 1h, 7d...) for the whole fleet, with monthly
        projections and recommendations (docs/COST.md)."""
        return await cost.report(request.app.state.ledger, settings, _window(window))

    @app.get("/usage", response_model=cost.TenantUsage)
    async def tenant_usage(
        request: Request, caller: CallerDep, window: str = "1h"
    ) -> cost.TenantUsage:
        """The calling key's tenant's requests, tokens and cost over the last `window`."""
        reader = request.app.state.ledger
        return await cost.tenant_usage(reader, settings, caller.tenant, _window(window))

    @app.get("/health")
    async def health(request: Request, ready: bool = False) -> JSONResponse:
        if not ready:
            return JSONResponse({"status": "alive"})
        state = await readiness(settings, request.app.state.redis, request.app.state.producer)
        return JSONResponse(state, status_code=200 if not state["failing"] else 503)

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        return await health(request, ready=True)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        # Read at scrape time: Redis holds one heartbeat per live worker.
        with contextlib.suppress(Exception):  # Redis down: the gauge keeps its last value
            workers = await sredis.live_workers(request.app.state.redis, settings)
            metrics.LIVE_WORKERS.set(len(workers))
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def _window(window: str) -> float:
    try:
        return cost.parse_window(window)
    except ValueError as e:
        raise invalid_field("window", str(e), window, where="query") from e


def app_from_env() -> FastAPI:
    """What each uvicorn process builds when SLUICE_API_WORKERS > 1."""
    _log_setup()
    return create_app(Settings())


def main() -> None:
    settings = Settings()
    _log_setup()
    if settings.api_workers == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
        return
    # Each process writes its metrics to files here and /metrics merges them; the variable
    # must be set before the processes (spawned, so importing afresh) load prometheus_client.
    metrics_dir = Path(
        os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="sluice-api-")
    )
    metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in metrics_dir.glob("*.db"):  # a previous run's counts are not this run's
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    uvicorn.run(
        "api.app:app_from_env",
        factory=True,
        workers=settings.api_workers,
        host=settings.host,
        port=settings.port,
        log_level="info",
    )


def _log_setup() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
