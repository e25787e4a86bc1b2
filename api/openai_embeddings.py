"""`POST /v1/embeddings`, served in the API process by the embedding model RAG uses.

The API already holds that model for retrieval queries, so embeddings take no trip through
Kafka: they are short, and no worker has the model loaded (a batch's embeddings lines do go
through Kafka, to the API processes: api/batch_embedder.py). Encoding runs in a thread, one
request at a time (torch already uses the cores it is given), in batches of
SLUICE_EMBEDDING_BATCH_SIZE. A request counts against its key's limits as one request of its
input tokens; its encode time is billed to the tenant at SLUICE_API_HOURLY_USD in the ledger, so
`/usage` and `/cost` (`by_tenant_usd`) include it. Token-id inputs are decoded with the model's
own tokenizer and encoded again (sentence-transformers takes text).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Sequence

import numpy as np
from fastapi.responses import JSONResponse

from api.auth import Caller
from api.openai_protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from api.openai_serving import OpenAIError
from api.ratelimit import RateLimiter
from api.serving import new_request_id
from shared.embeddings import Embedder
from shared.ledger import Ledger
from shared.settings import Settings


class EmbeddingsHandler:
    def __init__(
        self, settings: Settings, embedder: Embedder, limiter: RateLimiter, ledger: Ledger
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.limiter = limiter
        self.ledger = ledger
        self._encoding = asyncio.Lock()

    async def create(self, body: EmbeddingRequest, caller: Caller) -> JSONResponse:
        texts, tokens = await self.checked(body)
        await self.limiter.admit(caller, new_request_id(), tokens)
        response = await self.embed(body, texts, tokens, caller.tenant)
        headers = {"X-Sluice-Cost-Usd": f"{response.sluice_cost_usd:.10f}"}
        return JSONResponse(response.model_dump(), headers=headers)

    async def checked(self, body: EmbeddingRequest) -> tuple[list[str], int]:
        """The texts to encode and their tokens, or an OpenAIError naming the param."""
        self._check(body)
        return await asyncio.to_thread(self._texts, body.inputs())

    async def embed(
        self, body: EmbeddingRequest, texts: list[str], tokens: int, tenant: str
    ) -> EmbeddingResponse:
        """Encode and bill `tenant` (a checked body: `checked`)."""
        async with self._encoding:
            started = time.perf_counter()
            vectors = await asyncio.to_thread(self.embedder.embed, texts)
            seconds = time.perf_counter() - started
        dollars = seconds * self.settings.api_hourly_usd / 3600
        self._bill(tenant, tokens, seconds, dollars)
        data = [
            Embedding(index=i, embedding=_encoded(v, body.encoding_format))
            for i, v in enumerate(vectors)
        ]
        return EmbeddingResponse(
            data=data,
            model=body.model,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
            sluice_cost_usd=round(dollars, 10),
        )

    def _check(self, body: EmbeddingRequest) -> None:
        if body.model != self.settings.embedding_model:
            raise OpenAIError(
                404, f"The model `{body.model}` does not exist.", "model", "model_not_found"
            )
        dim = self.embedder.dim
        if body.dimensions is not None and body.dimensions != dim:
            raise OpenAIError(
                400, f"{body.model} makes {dim}-dimensional vectors; it cannot shorten them",
                "dimensions",
            )  # fmt: skip
        n, most = len(body.inputs()), self.settings.max_embedding_inputs
        if not 1 <= n <= most:
            raise OpenAIError(
                400, f"give 1 to {most} inputs (SLUICE_MAX_EMBEDDING_INPUTS)", "input"
            )

    def _texts(self, inputs: Sequence[str] | Sequence[list[int]]) -> tuple[list[str], int]:
        """The texts to encode and their token count; a 400 naming the input that cannot be."""
        tokenizer = self.embedder.tokenizer
        most = self.embedder.max_tokens - 2  # the model adds [CLS] and [SEP]
        texts, total = [], 0
        for i, given in enumerate(inputs):
            if isinstance(given, str):
                if not given.strip():
                    raise OpenAIError(400, f"input[{i}] is empty", "input")
                count = len(tokenizer.encode(given, add_special_tokens=False))
                text = given
            else:
                if max(given) >= len(tokenizer):
                    raise OpenAIError(
                        400, f"input[{i}] has token ids outside the vocabulary of "
                        f"{self.settings.embedding_model} ({len(tokenizer)} tokens)", "input",
                    )  # fmt: skip
                count, text = len(given), tokenizer.decode(given)
            if count > most:
                raise OpenAIError(
                    400, f"input[{i}] is {count} tokens; {self.settings.embedding_model} takes "
                    f"at most {most}", "input",
                )  # fmt: skip
            texts.append(text)
            total += count
        return texts, total

    def _bill(self, tenant: str, tokens: int, seconds: float, dollars: float) -> None:
        # Apart from the engine's fields (`requests`, `dollars`): the fleet report's per-request
        # figures are about generation. The tenant's own figures include it.
        self.ledger.add("embedding_requests", 1)
        self.ledger.add("embedding_tokens", tokens)
        self.ledger.add("embedding_seconds", seconds)
        self.ledger.add("embedding_dollars", dollars)
        self.ledger.add_tenant(tenant, self.settings.embedding_model, tokens, 0, dollars)


def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    # OpenAI's base64: the float32 values' little-endian bytes (what the openai client decodes).
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
