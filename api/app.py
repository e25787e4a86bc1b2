"""The HTTP API: routes only. It never runs a model; requests go to Kafka, tokens come back
over Redis (see api/serving.py and api/streaming.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.documents import DocumentsHandler
from api.health import readiness
from api.middleware import RequestMetrics
from api.rag import PromptTemplate, RagHandler
from api.schemas import (
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
from shared import kafka, metrics
from shared import redis as sredis
from shared.documents import DocumentStatus
from shared.embeddings import Embedder
from shared.models import model_path
from shared.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path(settings))
        await kafka.ensure_topics(settings)
        redis = sredis.connect(settings)
        producer = kafka.make_producer(settings)
        await producer.start()
        hub = StreamHub(redis, settings)
        await hub.start()
        app.state.redis, app.state.producer = redis, producer
        app.state.generate = GenerateHandler(settings, tokenizer, producer, hub)
        app.state.documents = DocumentsHandler(settings, producer, redis)
        embedder = await asyncio.to_thread(Embedder.load, settings)
        template = PromptTemplate.load(settings.rag_prompt_template)
        app.state.rag = RagHandler(settings, app.state.generate, embedder, template)
        try:
            yield
        finally:
            app.state.rag.close()
            await hub.stop()
            await producer.stop()
            await redis.aclose()

    app = FastAPI(title="Sluice", version="0.1.0", lifespan=lifespan)
    app.add_middleware(RequestMetrics)

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(body: GenerateBody, request: Request) -> Response | GenerateResponse:
        handler: GenerateHandler = request.app.state.generate
        if body.stream:
            return await handler.stream(body)
        return await handler.complete(body)

    @app.post("/rag-generate", response_model=RagGenerateResponse)
    async def rag_generate(
        body: RagGenerateBody, request: Request
    ) -> Response | RagGenerateResponse:
        return await request.app.state.rag.answer(body)

    @app.post("/retrieve", response_model=RetrieveResponse)
    async def retrieve(body: RetrieveBody, request: Request) -> RetrieveResponse:
        return await request.app.state.rag.ranked(body)

    @app.post("/documents", status_code=202, response_model=DocumentAccepted)
    async def add_document(request: Request) -> DocumentAccepted:
        """JSON (`DocumentBody`) or a multipart upload: `file`, optional `doc_id`, `title`,
        `metadata` (a JSON object)."""
        return await request.app.state.documents.add(request)

    @app.get("/documents/{doc_id:path}", response_model=DocumentStatus)
    async def document_status(doc_id: str, request: Request) -> DocumentStatus:
        return await request.app.state.documents.status(doc_id)

    @app.delete("/documents/{doc_id:path}", status_code=202, response_model=DocumentAccepted)
    async def delete_document(doc_id: str, request: Request) -> DocumentAccepted:
        return await request.app.state.documents.delete(doc_id)

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
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
