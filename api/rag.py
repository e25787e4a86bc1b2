"""Handlers of /retrieve and /rag-generate: retrieve passages, build the prompt, generate.

Generation goes through the same Kafka path as /generate (GenerateHandler), so streaming,
limits and errors behave the same; /rag-generate only adds the passages to the prompt and the
`sources` to the answer (in SSE, one `sources` event before the tokens).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from fastapi.responses import StreamingResponse

from api.auth import ANONYMOUS, Caller
from api.errors import invalid_field, unavailable
from api.idempotency import Key
from api.schemas import (
    GenerateBody,
    RagGenerateBody,
    RagGenerateResponse,
    RetrieveBody,
    RetrieveResponse,
    Source,
)
from api.serving import GenerateHandler, HungUp, Validated, new_request_id, response
from api.streaming import RequestFailed, sse
from shared import metrics
from shared.embeddings import Embedder
from shared.messages import ChatMessage
from shared.prompts import prompt_token_ids
from shared.retrieval import Retrieved, retrieve
from shared.settings import Settings
from shared.vectorstores import open_store
from shared.vectorstores.base import LexicalSearchUnsupported, VectorStore

SNIPPET_CHARS = 300


class PromptTemplate:
    """`[system]` and `[user]` sections of a text file; {question} and {passages} filled in."""

    def __init__(self, system: str, user: str) -> None:
        self.system = system
        self.user = user

    @classmethod
    def load(cls, path: Path) -> PromptTemplate:
        text = path.read_text()
        if "[system]" not in text or "[user]" not in text:
            raise ValueError(f"{path}: needs a [system] and a [user] section")
        system, user = text.split("[user]", 1)
        return cls(system.replace("[system]", "", 1).strip(), user.strip())

    def messages(self, question: str, passages: list[Retrieved]) -> list[ChatMessage]:
        numbered = "\n\n".join(
            f"[{n}] {_label(r)}\n{r.chunk.text}" for n, r in enumerate(passages, 1)
        )
        user = self.user.format(question=question, passages=numbered or "(none found)")
        return [
            ChatMessage(role="system", content=self.system),
            ChatMessage(role="user", content=user),
        ]


class RagHandler:
    def __init__(
        self,
        settings: Settings,
        generate: GenerateHandler,
        embedder: Embedder,
        template: PromptTemplate,
    ) -> None:
        self.settings = settings
        self.generate = generate
        self.embedder = embedder
        self.template = template
        self._store: VectorStore | None = None
        self._opening = asyncio.Lock()

    async def store(self) -> VectorStore:
        """The vector store, opened on first use: /generate must not depend on it, so the API
        starts without it and RAG answers 503 until it is reachable."""
        async with self._opening:
            if self._store is None:
                try:
                    self._store = await asyncio.to_thread(
                        open_store, self.settings, self.embedder.dim
                    )
                except Exception as e:
                    name = self.settings.vector_store
                    raise unavailable(f"the vector store ({name}) is unavailable", e) from e
            return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    async def retrieve(self, body: RetrieveBody) -> list[Retrieved]:
        mode = body.mode or ("hybrid" if self.settings.rag_hybrid else "dense")
        min_score = body.min_score if body.min_score is not None else self.settings.rag_min_score
        start = time.perf_counter()
        try:
            hits = await asyncio.to_thread(
                retrieve,
                await self.store(),
                self.embedder,
                body.query,
                body.top_k or self.settings.rag_top_k,
                body.filters,
                mode=mode,
                mmr=body.mmr,
                min_score=min_score,
            )
        except LexicalSearchUnsupported as e:
            raise invalid_field("mode", f"{self.settings.vector_store} has no BM25: {e}") from e
        except ValueError as e:  # a filter the store cannot express
            raise invalid_field("filters", str(e), body.filters) from e
        metrics.RETRIEVAL_LATENCY.labels(mode).observe(time.perf_counter() - start)
        return hits

    async def ranked(self, body: RetrieveBody, caller: Caller = ANONYMOUS) -> RetrieveResponse:
        await self.generate.limiter.admit(caller, new_request_id(), 0)
        return RetrieveResponse(results=sources(await self.retrieve(body)))

    async def answer(
        self, body: RagGenerateBody, caller: Caller = ANONYMOUS, hung_up: HungUp | None = None,
        key: Key | None = None, last_event_id: int = -1,
    ) -> StreamingResponse | RagGenerateResponse:  # fmt: skip
        async def build(rid: str) -> tuple[list[Validated], Any]:
            # Counted against the key before retrieval; the generation's admission replaces it.
            await self.generate.limiter.admit(caller, rid, 0)
            passages = await asyncio.to_thread(self._fit, body, await self.retrieve(body))
            request = GenerateBody(
                messages=self.template.messages(body.query, passages),
                max_tokens=body.max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                stop=body.stop,
                seed=body.seed,
                stream=body.stream,
            )
            message = await self.generate.to_message(request, caller.tenant, rid)
            return [message], [s.model_dump() for s in sources(passages)]

        # Under an Idempotency-Key a retry gets the first request's sources, not new ones.
        relays, cited = await self.generate.relays(caller, key, build, last_event_id)
        if body.stream:
            return self.generate.sse(relays[0], sse("sources", {"sources": cited}))
        try:
            whole = await self.generate.collect(relays[0], hung_up)
        except RequestFailed as e:
            raise HTTPException(e.status, e.message) from e
        return RagGenerateResponse(
            **response(whole, logprobs=False).model_dump(),
            sources=[Source.model_validate(c) for c in cited],
        )

    def _fit(self, body: RagGenerateBody, passages: list[Retrieved]) -> list[Retrieved]:
        """Drop the lowest-ranked passages until prompt + max_tokens fits the model's context
        (the question itself must fit; GenerateHandler rejects it with a 422 otherwise).
        Each passage is tokenized once and the whole prompt only when the sum says it fits:
        not the whole prompt again per dropped passage (50 passages: 50 prompts)."""
        budget = self.settings.max_model_len - (body.max_tokens or self.settings.default_max_tokens)
        tokenizer = self.generate.tokenizer

        def prompt_tokens(kept: list[Retrieved]) -> int:
            prompt = GenerateBody(messages=self.template.messages(body.query, kept))
            return len(prompt_token_ids(tokenizer, prompt))

        total = prompt_tokens(passages)
        if total <= budget:
            return passages
        kept = len(passages)
        while kept > 0 and total > budget:  # an estimate: passages tokenize a little apart
            kept -= 1
            text = f"[{kept + 1}] {_label(passages[kept])}\n{passages[kept].chunk.text}\n\n"
            total -= len(tokenizer.encode(text, add_special_tokens=False))
        while kept < len(passages) and prompt_tokens(passages[: kept + 1]) <= budget:
            kept += 1
        while kept > 0 and prompt_tokens(passages[:kept]) > budget:
            kept -= 1
        return passages[:kept]


def sources(passages: list[Retrieved]) -> list[Source]:
    return [
        Source(
            n=n,
            doc_id=r.chunk.doc_id,
            chunk_id=r.chunk.id,
            source=r.chunk.source,
            title=r.chunk.title,
            score=r.score,
            snippet=r.chunk.text[:SNIPPET_CHARS],
        )
        for n, r in enumerate(passages, 1)
    ]


def _label(r: Retrieved) -> str:
    return " - ".join(part for part in (r.chunk.title, r.chunk.source) if part)
