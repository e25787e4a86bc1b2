"""Retrieval for /retrieve and /rag-generate: find the chunks that best answer a query.

Three modes, so an evaluation can compare them on the same store:
  dense   nearest chunks by cosine similarity of embeddings (meaning, paraphrases)
  bm25    the store's lexical BM25 (exact words: names, codes, rare terms)
  hybrid  both, fused by reciprocal rank fusion: ranks, not scores, are combined, because
          cosine similarities and BM25 scores live on unrelated scales

Synchronous (embedding and store calls block); the API runs it with asyncio.to_thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from shared.embeddings import Embedder
from shared.vectorstores.base import Chunk, Filters, Hit, LexicalSearchUnsupported, VectorStore

Mode = Literal["dense", "bm25", "hybrid"]
RRF_K = 60  # the constant of Cormack et al.; damps the weight of the very first ranks


@dataclass(frozen=True)
class Retrieved:
    """One retrieved chunk and why it ranked where it did.

    score: what the mode ranked by: cosine similarity (dense), BM25 score (bm25) or RRF score
        (hybrid). MMR reorders the results (by cosine relevance) and leaves `score` as it was.
    dense_score: cosine similarity to the query; None for a chunk only BM25 found, unless
        min_score or MMR needed it computed.
    dense_rank, bm25_rank: 1-based rank in each list it came from, None if absent from it.
    """

    chunk: Chunk
    score: float
    dense_score: float | None = None
    dense_rank: int | None = None
    bm25_rank: int | None = None


def retrieve(
    store: VectorStore,
    embedder: Embedder,
    query: str,
    top_k: int,
    filters: Filters | None = None,
    *,
    mode: Mode = "hybrid",
    mmr: bool = False,
    mmr_lambda: float = 0.5,
    min_score: float | None = None,
) -> list[Retrieved]:
    """The best `top_k` chunks for `query`, best first.

    A hybrid search on a store without BM25 (Pinecone) is a dense search. `min_score` drops
    chunks whose cosine similarity to the query is below it, whatever the mode. `mmr` picks the
    `top_k` out of the candidates by maximal marginal relevance, trading cosine relevance for
    diversity (`mmr_lambda` 1.0 is pure relevance), so near-duplicate chunks do not crowd out
    the rest of the context.
    """
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    if not 0.0 <= mmr_lambda <= 1.0:
        raise ValueError("mmr_lambda must be between 0 and 1")
    # Rank fusion, min_score and MMR all need more than top_k to choose from.
    candidates = max(top_k * 4, 20)
    needs_query_vector = mode != "bm25" or mmr or min_score is not None
    query_vector = embedder.embed([query])[0] if needs_query_vector else []

    dense = store.search(query_vector, candidates, filters) if mode != "bm25" else []
    lexical: list[Hit] = []
    if mode != "dense":
        try:
            lexical = store.search_text(query, candidates, filters)
        except LexicalSearchUnsupported:
            if mode == "bm25":
                raise
            mode = "dense"
    ranked = rank(mode, dense, lexical)

    if mmr:
        return mmr_rerank(ranked[:candidates], query_vector, embedder, top_k, mmr_lambda, min_score)
    if min_score is not None:
        return above_min_score(ranked, query_vector, embedder, min_score, top_k)
    return ranked[:top_k]


def rank(mode: Mode, dense: Sequence[Hit], lexical: Sequence[Hit]) -> list[Retrieved]:
    if mode == "dense":
        return [
            Retrieved(h.chunk, h.score, dense_score=h.score, dense_rank=i)
            for i, h in enumerate(dense, 1)
        ]
    if mode == "bm25":
        return [Retrieved(h.chunk, h.score, bm25_rank=i) for i, h in enumerate(lexical, 1)]
    return fuse(dense, lexical)


def rrf(rankings: Sequence[Sequence[str]], k: int = RRF_K) -> dict[str, float]:
    """Reciprocal rank fusion: each id scores sum(1 / (k + rank)) over the rankings it is in
    (ranks from 1). Returned best first; ties keep the order ids were first seen in."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for position, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + position)
    return dict(sorted(scores.items(), key=lambda kv: kv[1], reverse=True))


def fuse(dense: Sequence[Hit], lexical: Sequence[Hit], k: int = RRF_K) -> list[Retrieved]:
    chunks = {h.chunk.id: h.chunk for h in (*dense, *lexical)}
    dense_at = {h.chunk.id: (i, h.score) for i, h in enumerate(dense, 1)}
    bm25_at = {h.chunk.id: i for i, h in enumerate(lexical, 1)}
    fused = rrf([[h.chunk.id for h in dense], [h.chunk.id for h in lexical]], k)
    return [
        Retrieved(
            chunks[cid],
            score,
            dense_score=dense_at[cid][1] if cid in dense_at else None,
            dense_rank=dense_at[cid][0] if cid in dense_at else None,
            bm25_rank=bm25_at.get(cid),
        )
        for cid, score in fused.items()
    ]


def above_min_score(
    ranked: Sequence[Retrieved],
    query_vector: Sequence[float],
    embedder: Embedder,
    min_score: float,
    top_k: int,
) -> list[Retrieved]:
    # Chunks only BM25 found have no cosine similarity yet; embedding them a window of top_k
    # at a time computes no more of them than it takes to fill top_k.
    kept: list[Retrieved] = []
    for start in range(0, len(ranked), top_k):
        window = with_dense_scores(ranked[start : start + top_k], query_vector, embedder)
        kept += [r for r in window if r.dense_score is not None and r.dense_score >= min_score]
        if len(kept) >= top_k:
            break
    return kept[:top_k]


def with_dense_scores(
    items: Sequence[Retrieved], query_vector: Sequence[float], embedder: Embedder
) -> list[Retrieved]:
    missing = [i for i, r in enumerate(items) if r.dense_score is None]
    result = list(items)
    if missing:
        vectors = embedder.embed([items[i].chunk.text for i in missing])
        for i, vector in zip(missing, vectors, strict=True):
            result[i] = replace(items[i], dense_score=dot(vector, query_vector))
    return result


def mmr_rerank(
    pool: Sequence[Retrieved],
    query_vector: Sequence[float],
    embedder: Embedder,
    top_k: int,
    lam: float,
    min_score: float | None,
) -> list[Retrieved]:
    # The stores do not return stored vectors; re-embedding a few dozen candidates is cheap
    # next to generation, and gives every candidate its cosine similarity on the way.
    vectors = embedder.embed([r.chunk.text for r in pool])
    scored = [
        (replace(r, dense_score=dot(v, query_vector)), v)
        for r, v in zip(pool, vectors, strict=True)
    ]
    if min_score is not None:
        scored = [
            (r, v) for r, v in scored if r.dense_score is not None and r.dense_score >= min_score
        ]
    return mmr_select([r for r, _ in scored], [v for _, v in scored], top_k, lam)


def mmr_select(
    pool: Sequence[Retrieved], vectors: Sequence[Sequence[float]], top_k: int, lam: float
) -> list[Retrieved]:
    """Maximal marginal relevance (Carbonell & Goldstein): repeatedly take the candidate
    maximising lam * cosine(query) - (1 - lam) * (its highest cosine to one already taken).

    Relevance is the cosine similarity even in bm25 and hybrid modes, where the mode only
    chose the candidates: RRF scores are too flat (1/61 .. 1/80) and BM25 scores unbounded,
    so neither trades off meaningfully against a cosine penalty.
    """
    relevance = [r.dense_score if r.dense_score is not None else 0.0 for r in pool]
    # 0 while nothing is taken; a dissimilar (negative) chunk earns no bonus for it.
    redundancy = [0.0] * len(pool)
    remaining = list(range(len(pool)))
    selected: list[int] = []
    while remaining and len(selected) < top_k:
        pick = max(remaining, key=lambda i: lam * relevance[i] - (1 - lam) * redundancy[i])
        selected.append(pick)
        remaining.remove(pick)
        for i in remaining:
            redundancy[i] = max(redundancy[i], dot(vectors[i], vectors[pick]))
    return [pool[i] for i in selected]


def dot(a: Sequence[float], b: Sequence[float]) -> float:
    # Embeddings are L2-normalized, so the dot product is the cosine similarity.
    return float(sum(x * y for x, y in zip(a, b, strict=True)))
