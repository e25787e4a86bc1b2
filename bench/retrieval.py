"""`sluice eval retrieval FILE.jsonl`: how well retrieval finds the labelled documents.

Each line: `{"query": "...", "relevant_doc_ids": ["..."]}`, judged against whatever is
ingested in the configured store (SLUICE_* settings). Retrieval returns chunks; a document's
rank is the rank of its best chunk. Reported per mode (dense, bm25, hybrid):

    recall@k   share of a query's relevant documents in its top k, averaged over queries
    MRR        1 / rank of the first relevant document (0 if not in the top 10)
    nDCG@10    rank-discounted gain of the relevant documents, binary relevance
    latency    wall time of one retrieval, p50/p99 ms

    sluice eval retrieval FILE.jsonl [--modes dense bm25 hybrid] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from bench.serving import machine, percentile
from shared.embeddings import Embedder
from shared.retrieval import retrieve
from shared.settings import Settings
from shared.vectorstores import open_store
from shared.vectorstores.base import VectorStore

KS = (1, 5, 10)
CHUNKS_PER_QUERY = 30  # chunks fetched, then folded into documents


def ranked_docs(store: VectorStore, embedder: Embedder, query: str, mode: str) -> list[str]:
    hits = retrieve(store, embedder, query, CHUNKS_PER_QUERY, mode=mode)  # type: ignore[arg-type]
    return list(dict.fromkeys(h.chunk.doc_id for h in hits))


def scores(ranking: list[str], relevant: set[str]) -> dict[str, float]:
    out = {f"recall@{k}": len(relevant & set(ranking[:k])) / len(relevant) for k in KS}
    first = next((i for i, d in enumerate(ranking[:10], 1) if d in relevant), None)
    out["mrr"] = 1 / first if first else 0.0
    dcg = sum(1 / math.log2(i + 1) for i, d in enumerate(ranking[:10], 1) if d in relevant)
    ideal = sum(1 / math.log2(i + 1) for i in range(1, min(len(relevant), 10) + 1))
    out["ndcg@10"] = dcg / ideal
    return out


def evaluate(
    store: VectorStore, embedder: Embedder, lines: list[dict], modes: list[str]
) -> dict[str, dict[str, float]]:
    results = {}
    for mode in modes:
        per_query, latencies = [], []
        for line in lines:
            start = time.perf_counter()
            ranking = ranked_docs(store, embedder, line["query"], mode)
            latencies.append((time.perf_counter() - start) * 1000)
            per_query.append(scores(ranking, set(line["relevant_doc_ids"])))
        summary = {key: statistics.fmean(q[key] for q in per_query) for key in per_query[0]}
        summary["latency_ms_p50"] = percentile(latencies, 50)
        summary["latency_ms_p99"] = percentile(latencies, 99)
        results[mode] = summary
    return results


def markdown(results: dict[str, dict[str, float]]) -> str:
    keys = [f"recall@{k}" for k in KS] + ["mrr", "ndcg@10"]
    lines = [
        "| mode | " + " | ".join(keys) + " | latency p50/p99 ms |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for mode, r in results.items():
        cells = [f"{r[k]:.3f}" for k in keys]
        latency = f"{r['latency_ms_p50']:.0f}/{r['latency_ms_p99']:.0f}"
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {latency} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sluice eval retrieval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", type=Path)
    parser.add_argument("--modes", nargs="+", default=["dense", "bm25", "hybrid"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    lines = [json.loads(line) for line in args.file.read_text().splitlines() if line.strip()]
    settings = Settings()
    embedder = Embedder.load(settings)
    store = open_store(settings, embedder.dim)
    try:
        results = evaluate(store, embedder, lines, args.modes)
        chunks = store.count()
    finally:
        store.close()
    print(markdown(results))
    if args.out:
        report = {"results": results, "queries": len(lines), "chunks": chunks,
                  "file": str(args.file), "store": settings.vector_store,
                  "machine": machine()}  # fmt: skip
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
