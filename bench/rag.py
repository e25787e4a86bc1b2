"""RAG benchmark: retrieval quality (dense vs BM25 vs hybrid), ingestion throughput, and Milvus
Lite query latency at 10k and 100k chunks.

1. Builds the stdlib-docstring corpus (bench/rag_corpus.py) and ingests it through the real path:
   `sluice ingest` -> Kafka (Tansu) -> the ingestion process -> embeddings -> Milvus Lite server.
   Throughput = chunks indexed / wall time from the first send to the last `indexed` status.
2. `sluice eval retrieval` on its 150 labelled queries, per mode.
3. Scale: synthetic chunks (random unit vectors, texts of words drawn from the corpus) in a
   separate collection, 10k then 100k; latency of the store's dense, BM25 and both searches
   (query embedding excluded: it is the same ~10-20 ms whatever the size).

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
from pathlib import Path

from bench import rag_corpus
from bench.retrieval import evaluate, markdown
from bench.serving import machine, percentile
from ingestion.submit import submit
from shared import devstack
from shared.embeddings import Embedder
from shared.settings import Settings
from shared.vectorstores import open_store
from shared.vectorstores.base import Chunk, VectorStore

SCALES = (10_000, 100_000)
SCALE_QUERIES = 200


def ingest_corpus(settings: Settings, corpus: Path, log_dir: Path) -> dict:
    stack = devstack.LocalStack(settings, log_dir)
    stack.start_ingestion()
    try:
        start = time.perf_counter()
        statuses = asyncio.run(submit(settings, [corpus], wait_s=3600))
        wall = time.perf_counter() - start
    finally:
        stack.stop()
    failed = sum(s != "indexed" for s in statuses.values())
    return {"documents": len(statuses), "not_indexed": failed, "wall_s": wall}


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
    queries = np.random.default_rng(7).standard_normal((SCALE_QUERIES, dim)).astype("float32")
    for name, run in (
        ("dense", lambda i: store.search(queries[i].tolist(), 10)),
        ("bm25", lambda i: store.search_text(" ".join(rng.choices(words, k=5)), 10)),
        ("dense_filtered", lambda i: store.search(queries[i].tolist(), 10, {"shard": 3})),
    ):
        times = []
        for i in range(SCALE_QUERIES):
            t = time.perf_counter()
            run(i)
            times.append((time.perf_counter() - t) * 1000)
        out[f"{name}_ms_p50"] = percentile(times, 50)
        out[f"{name}_ms_p99"] = percentile(times, 99)
    return out


def scale(settings: Settings, words: list[str], dim: int) -> list[dict]:
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
            result = {"chunks": store.count(), "insert_rows_per_s": (rows - first) / insert_s}
            result.update(latencies(store, words, dim, rng))
            results.append(result)
            print(f"{target} chunks: {result}", flush=True)
    finally:
        store.close()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sluice bench rag", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results/rag-cpu.json"))
    parser.add_argument("--skip-scale", action="store_true")
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
    )  # fmt: skip
    try:
        ingest = ingest_corpus(settings, work / "corpus" / "pydoc", work)
        embedder = Embedder.load(settings)
        store = open_store(settings, embedder.dim)
        ingest["chunks"] = store.count()
        ingest["chunks_per_s"] = ingest["chunks"] / ingest["wall_s"]
        print(f"ingestion: {ingest}", flush=True)
        queries = (work / "corpus" / "queries.jsonl").read_text().splitlines()
        lines = [json.loads(x) for x in queries]
        quality = evaluate(store, embedder, lines, ["dense", "bm25", "hybrid"])
        store.close()
        print(markdown(quality), flush=True)
        texts = (f.read_text() for f in (work / "corpus" / "pydoc").iterdir())
        words = sorted({w for t in texts for w in t.split() if w.isalpha()})
        scaled = [] if args.skip_scale else scale(settings, words, embedder.dim)
    finally:
        devstack.stop(milvus)
        devstack.stop(broker)
    config = {
        "chunk_tokens": settings.chunk_tokens,
        "chunk_overlap_tokens": settings.chunk_overlap_tokens,
        "embedding_model": settings.embedding_model,
        "machine": machine(),
    }
    report = {
        "corpus": {"documents": n_docs, "queries": n_queries},
        "ingestion": ingest,
        "retrieval": quality,
        "scale": scaled,
        "config": config,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
