"""The vector stores against real backends and real embeddings: embedded Milvus Lite in a temp
file always, Pinecone when PINECONE_API_KEY is set (no fake server: a fake would only test
itself). Both run the same behaviours (StoreBehaviours)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shared.embeddings import Embedder
from shared.settings import Settings
from shared.vectorstores.base import Chunk, LexicalSearchUnsupported, VectorStore
from shared.vectorstores.milvus import MilvusStore, filter_expr
from shared.vectorstores.pinecone import PineconeStore, metadata_filter, to_chunk, to_metadata

T = TypeVar("T")

DOCS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "rust": (
        "docs/rust.md",
        {"lang": "en", "year": 2015},
        [
            "Rust's borrow checker enforces that a value has either one mutable reference or "
            "any number of shared references, which rules out data races at compile time.",
            "Cargo is the Rust package manager; it builds code and downloads dependencies.",
        ],
    ),
    "baking": (
        "docs/baking.md",
        {"lang": "en", "year": 2020},
        [
            "A sourdough starter is a culture of wild yeast and lactic acid bacteria.",
            "The Kvasirloaf method proofs the dough overnight in a cold refrigerator.",
            "Bake the loaf in a preheated Dutch oven for a crisp crust.",
        ],
    ),
    "cats": (
        "web/cats.html",
        {"lang": "fr", "year": 2020},
        ["Les chats dorment entre douze et seize heures par jour."],
    ),
}


def make_chunks(
    doc_id: str, content_hash: str = "v1", texts: list[str] | None = None
) -> list[Chunk]:
    source, metadata, default_texts = DOCS[doc_id]
    return [
        Chunk(
            id=f"{doc_id}#{i}",
            doc_id=doc_id,
            position=i,
            text=text,
            source=source,
            title=doc_id.title(),
            content_hash=content_hash,
            metadata=metadata,
        )
        for i, text in enumerate(texts if texts is not None else default_texts)
    ]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load(Settings())


class StoreBehaviours:
    """Run by each backend's subclass, which provides the `store` fixture."""

    lexical = True
    settle_s = 0.0  # how long writes may take to become visible to reads

    def eventually(self, check: Callable[[], T]) -> T:
        # Milvus reads its writes at once (Strong consistency); Pinecone catches up in seconds.
        deadline = time.monotonic() + self.settle_s
        while True:
            try:
                return check()
            except AssertionError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)

    def ingest(self, store: VectorStore, embedder: Embedder, chunks: list[Chunk]) -> None:
        store.upsert(chunks, embedder.embed([c.text for c in chunks]))

    @pytest.fixture
    def loaded(self, store: VectorStore, embedder: Embedder) -> VectorStore:
        for doc_id in DOCS:
            self.ingest(store, embedder, make_chunks(doc_id))
        vector = embedder.embed(["anything"])[0]
        self.eventually(lambda: self.check_hits(store, vector, 6))
        return store

    @staticmethod
    def check_count(store: VectorStore, doc_id: str | None, expected: int) -> None:
        assert store.count(doc_id) == expected

    @staticmethod
    def check_hits(store: VectorStore, vector: list[float], expected: int) -> None:
        assert len(store.search(vector, 10)) == expected

    def test_dense_search_finds_a_paraphrase(self, loaded: VectorStore, embedder: Embedder) -> None:
        query = embedder.embed(["How does the compiler stop two threads writing the same memory?"])
        hits = loaded.search(query[0], 3)
        assert hits[0].chunk.id == "rust#0"
        assert hits[0].chunk.metadata == {"lang": "en", "year": 2015}
        assert hits[0].chunk.source == "docs/rust.md" and hits[0].chunk.position == 0
        assert 0.3 < hits[0].score <= 1.0001
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    def test_search_text_finds_a_rare_keyword(self, loaded: VectorStore) -> None:
        if not self.lexical:
            with pytest.raises(LexicalSearchUnsupported):
                loaded.search_text("Kvasirloaf", 3)
            return
        hits = loaded.search_text("kvasirloaf", 3)
        assert [h.chunk.id for h in hits] == ["baking#1"]
        assert hits[0].score > 0
        assert loaded.search_text("   ", 3) == []

    def test_filters_restrict_results(self, loaded: VectorStore, embedder: Embedder) -> None:
        vector = embedder.embed(["bread and code and cats"])[0]

        def doc_ids(filters: dict[str, Any]) -> set[str]:
            return {h.chunk.doc_id for h in loaded.search(vector, 10, filters)}

        assert doc_ids({"doc_id": "cats"}) == {"cats"}
        assert doc_ids({"doc_id": ["cats", "rust"]}) == {"cats", "rust"}
        assert doc_ids({"source": "docs/baking.md"}) == {"baking"}
        assert doc_ids({"lang": "fr"}) == {"cats"}
        assert doc_ids({"year": 2020}) == {"baking", "cats"}
        assert doc_ids({"year": [2015, 2020], "lang": "en"}) == {"rust", "baking"}
        assert doc_ids({"lang": "de"}) == set()
        if self.lexical:
            hits = loaded.search_text("the", 10, {"doc_id": "baking"})
            assert {h.chunk.doc_id for h in hits} == {"baking"}

    def test_bad_filters_raise(self, loaded: VectorStore) -> None:
        vector = [0.1] * loaded.dim
        for bad in (
            {'lang"] == "x" or 1==1 or ["a': "x"},
            {"year": {"$gt": 1}},
            {"year": None},
            {"doc_id": 3},
            {"lang": []},
            {"year": float("nan")},
        ):
            with pytest.raises(ValueError):
                loaded.search(vector, 3, bad)

    def test_delete_stale_keeps_the_current_version(
        self, loaded: VectorStore, embedder: Embedder
    ) -> None:
        # Re-ingesting baking with 2 chunks instead of 3: chunk 2 of v1 must go too.
        self.ingest(loaded, embedder, make_chunks("baking", "v2", ["New first.", "New second."]))
        loaded.delete_stale("baking", keep_hash="v2")
        vector = embedder.embed(["sourdough"])[0]

        def check() -> None:
            hits = loaded.search(vector, 10, {"doc_id": "baking"})
            assert {(h.chunk.id, h.chunk.content_hash) for h in hits} == {
                ("baking#0", "v2"),
                ("baking#1", "v2"),
            }

        self.eventually(check)
        self.eventually(lambda: self.check_count(loaded, "baking", 2))
        assert loaded.document_hash("baking") == "v2"
        assert loaded.count("rust") == 2  # other documents untouched
        loaded.delete_stale("rust", keep_hash="v1")  # nothing stale: nothing removed
        assert loaded.count("rust") == 2

    def test_delete_document_and_counts(self, loaded: VectorStore) -> None:
        assert loaded.count("rust") == 2
        assert loaded.document_hash("rust") == "v1"
        assert loaded.document_hash("nope") is None
        loaded.delete_document("rust")
        self.eventually(lambda: self.check_count(loaded, "rust", 0))
        self.eventually(lambda: self.check_count(loaded, None, 4))
        assert loaded.document_hash("rust") is None

    def test_upsert_nothing_and_mismatched_lengths(self, store: VectorStore) -> None:
        store.upsert([], [])
        assert store.count() == 0
        with pytest.raises(ValueError):
            store.upsert(make_chunks("cats"), [])


class TestMilvus(StoreBehaviours):
    @pytest.fixture
    def store(self, tmp_path: Path, embedder: Embedder) -> Iterator[MilvusStore]:
        settings = Settings(
            milvus_uri=str(tmp_path / "sub" / "m.db"), collection=f"t_{uuid.uuid4().hex[:8]}"
        )
        store = MilvusStore.open(settings, embedder.dim)
        yield store
        store.close()

    def test_reopen_keeps_data_and_checks_dim(self, tmp_path: Path, embedder: Embedder) -> None:
        settings = Settings(milvus_uri=str(tmp_path / "m.db"), collection="reopen")
        store = MilvusStore.open(settings, embedder.dim)
        self.ingest(store, embedder, make_chunks("cats"))
        store.close()
        store = MilvusStore.open(settings, embedder.dim)
        assert store.count() == 1
        store.close()
        with pytest.raises(RuntimeError, match="384-d"):
            MilvusStore.open(settings, 8)

    def test_uri_must_be_a_db_file_or_a_server(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"\.db"):
            MilvusStore.open(Settings(milvus_uri=str(tmp_path / "milvus")), 8)


def test_milvus_filter_expression_escapes_values() -> None:
    assert filter_expr(None) == ""
    assert filter_expr({"doc_id": 'a"b\\c', "n": [1, 2.5, True]}) == (
        '(doc_id == "a\\"b\\\\c") and (metadata["n"] == 1 or metadata["n"] == 2.5 '
        'or metadata["n"] == true)'
    )
    with pytest.raises(ValueError, match="control"):
        filter_expr({"source": "a\x00b"})
    with pytest.raises(ValueError, match="'bad key'"):
        filter_expr({"bad key": "x"})


def test_pinecone_records_and_filters_translate() -> None:
    # Pure translation, no server: metadata kept flat and prefixed, read back unchanged.
    chunk = replace(make_chunks("rust")[0], metadata={"lang": "en", "tags": ["a"], "n": 2})
    record = to_metadata(chunk)
    assert record["m_lang"] == "en" and record["m_n"] == 2 and "m_tags" not in record
    assert to_chunk(chunk.id, {**record, "position": 0.0}) == chunk
    assert metadata_filter({"doc_id": "rust", "lang": ["en", "fr"], "n": 2}) == {
        "doc_id": {"$eq": "rust"},
        "m_lang": {"$in": ["en", "fr"]},
        "m_n": {"$eq": 2},
    }
    for bad in ({"a-b": 1}, {"source": 1}, {"n": {"$gt": 1}}, {"n": []}):
        with pytest.raises(ValueError):
            metadata_filter(bad)


@pytest.mark.skipif(not os.environ.get("PINECONE_API_KEY"), reason="PINECONE_API_KEY not set")
class TestPinecone(StoreBehaviours):
    lexical = False
    settle_s = 60.0

    @pytest.fixture
    def store(self, embedder: Embedder) -> Iterator[PineconeStore]:
        settings = Settings(
            pinecone_api_key=os.environ["PINECONE_API_KEY"],
            pinecone_index=os.environ.get("SLUICE_PINECONE_INDEX", "sluice-test"),
            collection=f"t-{uuid.uuid4().hex[:8]}",  # a namespace of its own
        )
        store = PineconeStore.open(settings, embedder.dim)
        yield store
        for doc_id in DOCS:
            store.delete_document(doc_id)
        store.close()
