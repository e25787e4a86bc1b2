"""RAG benchmark: retrieval quality (dense vs BM25 vs hybrid), ingestion throughput, and Milvus
Lite query latency at 10k and 100k chunks.

1. Builds the stdlib-docstring corpus (bench/rag_corpus.py) and ingests it through the real path:
   `sluice ingest` -> Kafka (Tansu) -> the ingestion process -> embeddings -> Milvus Lite server.
   Throughput = chunks indexed / wall time from the first send to the last `indexed` status.
2. `sluice eval retrieval` on its 150 labelled queries, per mode.
3. Scale: synthetic chunks (random unit vectors, texts of words drawn from the corpus) in a
   collection of the same Milvus Lite server, 10k then 100k, flushed; insert rate and the
   latency of the store's dense, filtered dense and BM25 searches (query embedding excluded).

    sluice bench rag [--out bench/results/rag-cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bench import rag_corpus
from bench.retrieval import evaluate, markdown
from bench.serving import machine, percentile
from ingestion.submit import submit
from shared import devstack
from shared import redis as sredis
from shared.documents import get_status
from shared.embeddings import Embedder
from shared.settings import Settings
from shared.vectorstores import open_store
from shared.vectorstores.base import Chunk, VectorStore

SCALES = (10_000, 100_000)
# Queries per search kind: Milvus Lite rebuilds its BM25 index (pure Python) on every lexical
# search, so BM25 gets only a few.
SCALE_QUERIES = {"dense": 100, "dense_filtered": 100, "bm25": 3}


def ingest_corpus(settings: Settings, corpus: Path, log_dir: Path) -> dict:
    stack = devstack.LocalStack(settings, log_dir)
    stack.start_ingestion()
    try:
        start = time.perf_counter()
        statuses = asyncio.run(submit(settings, [corpus], wait_s=3600))
        wall = time.perf_counter() - start
        times = asyncio.run(indexed_at(settings, list(statuses)))
    finally:
        stack.stop()
    failed = sum(s != "indexed" for s in statuses.values())
    # Wall time includes the ingestion process starting (model load, group join); the span
    # between the first and the last document indexed is the steady rate.
    return {"documents": len(statuses), "not_indexed": failed, "wall_s": wall,
            "first_to_last_indexed_s": max(times) - min(times)}  # fmt: skip


async def indexed_at(settings: Settings, doc_ids: list[str]) -> list[float]:
    redis = sredis.connect(settings)
    try:
        statuses = [await get_status(redis, settings, d) for d in doc_ids]
    finally:
        await redis.aclose()
    return [s.updated_at for s in statuses if s is not None]


def synthetic(n: int, start: int, words: list[str], dim: int, rng: random.Random) -> tuple:
    import numpy as np

    vectors = np.random.default_rng(start).standard_normal((n, dim)).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    chunks = [
        Chunk(id=f"syn#{i}", doc_id=f"syn-{i // 10}", position=i % 10,
              text=" ".join(rng.choices(words, k=60)), source="synthetic", title="",
              content_hash="x", metadata={"shard": i % 7})
        for i in range(start, start + n)
    ]  # fmt: skip
    return chunks, vectors.tolist()


def latencies(store: VectorStore, words: list[str], dim: int, rng: random.Random) -> dict:
    import numpy as np

    out: dict[str, float] = {}
    queries = np.random.default_rng(7).standard_normal((100, dim)).astype("float32")
    for name, run in (
        ("dense", lambda i: store.search(queries[i].tolist(), 10)),
        ("dense_filtered", lambda i: store.search(queries[i].tolist(), 10, {"shard": 3})),
        ("bm25", lambda i: store.search_text(" ".join(rng.choices(words, k=5)), 10)),
    ):
        times = []
        for i in range(SCALE_QUERIES[name]):
            t = time.perf_counter()
            run(i)
            times.append((time.perf_counter() - t) * 1000)
        out[f"{name}_ms_p50"] = percentile(times, 50)
        out[f"{name}_ms_p99"] = percentile(times, 99)
    return out


def scale(
    settings: Settings, words: list[str], dim: int, save: Callable[[list[dict]], None]
) -> list[dict]:
    """Each size's results are saved as soon as measured: the 100k step is slow."""
    rng = random.Random(1)
    collection = f"scale_{uuid.uuid4().hex[:6]}"
    store = open_store(settings.model_copy(update={"collection": collection}), dim)
    rows, results = 0, []
    try:
        for target in SCALES:
            insert_s, first = 0.0, rows
            while rows < target:
                n = min(2000, target - rows)
                chunks, vectors = synthetic(n, rows, words, dim, rng)
                t = time.perf_counter()
                store.upsert(chunks, vectors)
                insert_s += time.perf_counter() - t
                rows += n
            # Sealed, as a collection at rest: Milvus Lite otherwise rebuilds a search snapshot
            # of all unflushed rows on every search (docs/RAG.md).
            store._client.flush(store._collection)  # type: ignore[attr-defined]
            result = {"chunks": store.count(), "insert_rows_per_s": (rows - first) / insert_s}
            result.update(latencies(store, words, dim, rng))
            results.append(result)
            save(results)
            print(f"{target} chunks: {result}", flush=True)
    finally:
        store.close()
    return results


def quality_and_ingestion(settings: Settings, embedder: Embedder, work: Path) -> dict:
    ingest = ingest_corpus(settings, work / "corpus" / "pydoc", work)
    store = open_store(settings, embedder.dim)
    try:
        ingest["chunks"] = store.count()
        ingest["chunks_per_s"] = ingest["chunks"] / ingest["wall_s"]
        ingest["chunks_per_s_steady"] = ingest["chunks"] / ingest["first_to_last_indexed_s"]
        print(f"ingestion: {ingest}", flush=True)
        queries = (work / "corpus" / "queries.jsonl").read_text().splitlines()
        lines = [json.loads(x) for x in queries]
        quality = evaluate(store, embedder, lines, ["dense", "bm25", "hybrid"])
    finally:
        store.close()
    print(markdown(quality), flush=True)
    return {"ingestion": ingest, "retrieval": quality}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sluice bench rag", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results/rag-cpu.json"))
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--only-scale", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-rag-"))
    n_docs, n_queries = rag_corpus.build(work / "corpus", 150)
    broker_port, milvus_port = devstack.free_port(), devstack.free_port()
    broker = devstack.start_broker(broker_port, work / "broker.log")
    milvus = devstack.start_milvus(milvus_port, work / "milvus", work / "milvus.log")
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        kafka=f"127.0.0.1:{broker_port}", milvus_uri=f"http://127.0.0.1:{milvus_port}",
        redis_prefix=f"sluice-bench-{tag}", collection=f"pydoc_{tag}",
        auth_enabled=False,  # as `sluice up`: the benchmark measures retrieval, not keys
    )  # fmt: skip
    try:
        embedder = Embedder.load(settings)
        texts = (f.read_text() for f in (work / "corpus" / "pydoc").iterdir())
        words = sorted({w for t in texts for w in t.split() if w.isalpha()})
        # --only-scale keeps the ingestion and retrieval results of the last full run.
        report = json.loads(args.out.read_text()) if args.only_scale else {}
        if not args.only_scale:
            report.update(quality_and_ingestion(settings, embedder, work))
            report["corpus"] = {"documents": n_docs, "queries": n_queries}
        report["config"] = {
            "chunk_tokens": settings.chunk_tokens,
            "chunk_overlap_tokens": settings.chunk_overlap_tokens,
            "embedding_model": settings.embedding_model,
            "machine": machine(),
        }

        def save(scaled: list[dict]) -> None:
            args.out.write_text(json.dumps({**report, "scale": scaled}, indent=2))

        save([])
        if not args.skip_scale:
            scale(settings, words, embedder.dim, save)
    finally:
        devstack.stop(milvus)
        devstack.stop(broker)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
