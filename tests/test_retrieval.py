"""Retrieval modes, fusion, min_score and MMR on a real Milvus Lite store with real embeddings
(a ten-chunk corpus), plus the fusion and MMR arithmetic on plain lists."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from shared.embeddings import Embedder
from shared.retrieval import Retrieved, fuse, mmr_select, retrieve, rrf
from shared.settings import Settings
from shared.vectorstores.base import Chunk, Filters, Hit, LexicalSearchUnsupported
from shared.vectorstores.milvus import MilvusStore

CORPUS = {
    "eiffel-a": "The Eiffel Tower is 330 metres tall and stands on the Champ de Mars in Paris.",
    "eiffel-b": "Standing on the Champ de Mars in Paris, the Eiffel Tower is 330 metres tall.",
    "louvre": "The Louvre in Paris is the world's most visited art museum, home of the Mona Lisa.",
    "felines": "Felines spend most of the day asleep, often twelve to sixteen hours.",
    "dogs": "Dogs were domesticated from wolves thousands of years ago.",
    "error": "Error QX-4471 means the disk quota was exceeded; free space and retry.",
    "disk": "When a storage volume runs out of room, writes fail until space is freed.",
    "python": "Python lists grow dynamically and support slicing and comprehensions.",
    "rust": "Rust guarantees memory safety without a garbage collector through ownership.",
    "coffee": "Espresso is brewed by forcing hot water through finely ground coffee beans.",
}
# Shares no word with the felines chunk: BM25 cannot find it, embeddings can.
PARAPHRASE = "how much do cats sleep"


def chunk(doc_id: str, text: str = "") -> Chunk:
    return Chunk(
        id=f"{doc_id}#0",
        doc_id=doc_id,
        position=0,
        text=text or CORPUS.get(doc_id, doc_id),
        source=f"{doc_id}.txt",
        title=doc_id,
        content_hash="h",
    )


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load(Settings())


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Iterator[MilvusStore]:
    path: Path = tmp_path_factory.mktemp("retrieval") / "m.db"
    store = MilvusStore.open(Settings(milvus_uri=str(path), collection="corpus"), embedder.dim)
    chunks = [chunk(doc_id) for doc_id in CORPUS]
    store.upsert(chunks, embedder.embed([c.text for c in chunks]))
    yield store
    store.close()


def doc_ids(results: Sequence[Retrieved]) -> list[str]:
    return [r.chunk.doc_id for r in results]


def test_dense_finds_a_paraphrase_that_bm25_misses(store: MilvusStore, embedder: Embedder) -> None:
    dense = retrieve(store, embedder, PARAPHRASE, 3, mode="dense")
    assert doc_ids(dense)[0] == "felines"
    assert dense[0].score == dense[0].dense_score and dense[0].dense_rank == 1
    assert "felines" not in doc_ids(retrieve(store, embedder, PARAPHRASE, 3, mode="bm25"))
    hybrid = retrieve(store, embedder, PARAPHRASE, 3, mode="hybrid")
    assert doc_ids(hybrid)[0] == "felines" and hybrid[0].bm25_rank is None


def test_bm25_and_hybrid_rank_an_exact_code_first(store: MilvusStore, embedder: Embedder) -> None:
    bm25 = retrieve(store, embedder, "QX-4471", 3, mode="bm25")
    assert doc_ids(bm25) == ["error"]  # no other chunk has either token
    assert bm25[0].score > 0 and bm25[0].dense_score is None and bm25[0].bm25_rank == 1
    hybrid = retrieve(store, embedder, "what does QX-4471 mean", 3, mode="hybrid")
    top = hybrid[0]
    assert top.chunk.doc_id == "error" and (top.dense_rank, top.bm25_rank) == (1, 1)
    assert top.score == pytest.approx(2 / 61)  # first in both lists
    assert top.dense_score is not None and 0 < top.dense_score <= 1.0001


def test_filters_reach_both_searches(store: MilvusStore, embedder: Embedder) -> None:
    results = retrieve(store, embedder, "Eiffel Tower Paris", 5, {"doc_id": ["louvre", "dogs"]})
    assert set(doc_ids(results)) == {"louvre", "dogs"}
    assert all(r.bm25_rank is None or r.chunk.doc_id == "louvre" for r in results)


def test_min_score_drops_weak_matches(store: MilvusStore, embedder: Embedder) -> None:
    query = "How tall is the Eiffel Tower?"
    assert len(retrieve(store, embedder, query, 4)) == 4
    for mode in ("dense", "bm25", "hybrid"):
        kept = retrieve(store, embedder, query, 4, mode=mode, min_score=0.5)
        assert sorted(doc_ids(kept)) == ["eiffel-a", "eiffel-b"], mode
        assert all(r.dense_score is not None and r.dense_score >= 0.5 for r in kept)
    assert retrieve(store, embedder, query, 4, min_score=0.99) == []


def test_mmr_drops_a_near_duplicate(store: MilvusStore, embedder: Embedder) -> None:
    query = "How tall is the Eiffel Tower?"
    assert sorted(doc_ids(retrieve(store, embedder, query, 2))) == ["eiffel-a", "eiffel-b"]
    for mode in ("dense", "hybrid"):
        diverse = doc_ids(retrieve(store, embedder, query, 2, mode=mode, mmr=True))
        assert len(diverse) == 2 and diverse[0] in ("eiffel-a", "eiffel-b"), mode
        assert not {"eiffel-a", "eiffel-b"} <= set(diverse), mode
    # lambda 1.0 is pure relevance: the duplicates come back.
    same = retrieve(store, embedder, query, 2, mode="dense", mmr=True, mmr_lambda=1.0)
    assert sorted(doc_ids(same)) == ["eiffel-a", "eiffel-b"]


class DenseOnly:
    """The Milvus store without its BM25, as Pinecone is."""

    def __init__(self, inner: MilvusStore) -> None:
        self.inner = inner
        self.dim = inner.dim

    def search(
        self, vector: Sequence[float], top_k: int, filters: Filters | None = None
    ) -> list[Hit]:
        return self.inner.search(vector, top_k, filters)

    def search_text(self, query: str, top_k: int, filters: Filters | None = None) -> list[Hit]:
        raise LexicalSearchUnsupported


def test_hybrid_falls_back_to_dense_without_bm25(store: MilvusStore, embedder: Embedder) -> None:
    dense_only = DenseOnly(store)
    hybrid = retrieve(dense_only, embedder, "QX-4471", 3, mode="hybrid")  # type: ignore[arg-type]
    dense = retrieve(store, embedder, "QX-4471", 3, mode="dense")
    assert hybrid == dense
    with pytest.raises(LexicalSearchUnsupported):
        retrieve(dense_only, embedder, "QX-4471", 3, mode="bm25")  # type: ignore[arg-type]


def test_bad_arguments_raise(store: MilvusStore, embedder: Embedder) -> None:
    with pytest.raises(ValueError):
        retrieve(store, embedder, "x", 0)
    with pytest.raises(ValueError):
        retrieve(store, embedder, "x", 3, mmr=True, mmr_lambda=1.5)


def test_rrf_sums_reciprocal_ranks() -> None:
    fused = rrf([["a", "b", "c"], ["c", "a"]])
    assert fused == pytest.approx({"a": 1 / 61 + 1 / 62, "c": 1 / 63 + 1 / 61, "b": 1 / 62})
    assert list(fused) == ["a", "c", "b"]
    assert list(rrf([["x", "y"], ["y", "x"]], k=1)) == ["x", "y"]  # a tie keeps first-seen order
    assert rrf([[], []]) == {}


def test_fuse_keeps_each_lists_rank_and_the_dense_score() -> None:
    dense = [Hit(chunk("a"), 0.9), Hit(chunk("b"), 0.5)]
    lexical = [Hit(chunk("c"), 7.0), Hit(chunk("a"), 3.0)]
    fused = fuse(dense, lexical)
    assert [(r.chunk.id, r.dense_rank, r.bm25_rank, r.dense_score) for r in fused] == [
        ("a#0", 1, 2, 0.9),
        ("c#0", None, 1, None),
        ("b#0", 2, None, 0.5),
    ]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62)


def test_mmr_select_trades_relevance_for_diversity() -> None:
    pool = [
        Retrieved(chunk(name), 0.0, dense_score=s)
        for name, s in [("a", 0.9), ("b", 0.89), ("c", 0.6)]
    ]
    vectors = [[1.0, 0.0], [0.995, 0.0999], [0.0, 1.0]]  # b is nearly a
    assert doc_ids(mmr_select(pool, vectors, 2, lam=0.5)) == ["a", "c"]
    assert doc_ids(mmr_select(pool, vectors, 2, lam=1.0)) == ["a", "b"]
    assert doc_ids(mmr_select(pool, vectors, 5, lam=0.5)) == ["a", "c", "b"]
    assert mmr_select([], [], 3, lam=0.5) == []
