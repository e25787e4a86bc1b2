"""Sluice's own Prometheus metrics (`sluice_*`).

Engine metrics are vLLM's own (`vllm:*`): the engine registers them in the worker process and
the worker's /metrics serves them, so vLLM dashboards work unchanged. What is defined here is
what only Sluice sees: the HTTP side, the queue, and the stream relay.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# API
REQUESTS = Counter(
    "sluice_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"]
)
# Gauges say how to combine API processes (SLUICE_API_WORKERS > 1, prometheus multiprocess mode).
OPEN_STREAMS = Gauge(
    "sluice_open_streams", "SSE streams currently open", multiprocess_mode="livesum"
)
CLIENT_TTFT = Histogram(
    "sluice_time_to_first_token_seconds",
    "Request accepted by the API to first token relayed, as the client sees it",
    ["model_name"],
    buckets=_LATENCY_BUCKETS,
)
CLIENT_ITL = Histogram(
    "sluice_inter_token_latency_seconds",
    "Gap between tokens as the client sees it (a coalesced event's gap is spread over its tokens)",
    ["model_name"],
    buckets=_LATENCY_BUCKETS,
)
DELIVERY_LATENCY = Histogram(
    "sluice_stream_delivery_latency_seconds",
    "Worker publishes tokens to Redis to the API relaying them to the client's stream",
    buckets=_LATENCY_BUCKETS,
)
CLIENT_E2E = Histogram(
    "sluice_e2e_request_latency_seconds",
    "Request accepted by the API to done event relayed",
    ["model_name"],
    buckets=_LATENCY_BUCKETS,
)


def start_model_series(models: list[str]) -> None:
    """Every model's latency series, at 0 from the start: a labelled series is born at its
    first observation, so rate() over it would miss that first increase (a quiet model's
    first requests would never show in the percentiles)."""
    for model in models:
        for histogram in (CLIENT_TTFT, CLIENT_ITL, CLIENT_E2E):
            histogram.labels(model)


# Worker
KAFKA_QUEUE_TIME = Histogram(
    "sluice_kafka_queue_time_seconds",
    "Request produced by the API to picked up by a worker",
    ["topic"],
    buckets=_LATENCY_BUCKETS,
)
DEAD_LETTERED = Counter(
    "sluice_dead_lettered", "Messages moved to the dead-letter topic", ["topic"]
)
IN_FLIGHT = Gauge("sluice_worker_in_flight", "Requests this worker is serving")
TAKEOVERS = Counter(
    "sluice_request_takeovers",
    "Requests this worker continued after their worker died or handed them over",
    ["feed"],
)
REDELIVERED = Counter(
    "sluice_redeliveries_not_rerun",
    "Redelivered records whose request was already running or done elsewhere",
    ["state"],
)
# From the consumer's own fetch responses (highwater) and position, not from ListOffsets: that
# is right on the dev broker too, whose ListOffsets(latest) answers wrong.
KAFKA_LAG = Gauge(
    "sluice_kafka_consumer_lag",
    "Records in the partition this consumer has not fetched yet (highwater - position)",
    ["topic", "partition", "group"],
)
LIVE_WORKERS = Gauge(
    "sluice_live_workers", "Workers with a fresh heartbeat in Redis", multiprocess_mode="max"
)

# Cost (workers/cost.py): engine time shared among batched requests by token share
REQUEST_COST = Histogram(
    "sluice_request_cost_dollars",
    "Engine cost of one request at the configured instance price",
    buckets=(1e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 1.0),
)
COST_TOTAL = Counter(
    "sluice_cost_dollars", "Engine cost of finished requests", ["model_name", "tenant"]
)
ENGINE_ATTRIBUTED = Counter(
    "sluice_engine_attributed_seconds",
    "Engine seconds attributed to finished requests (compare with sluice_engine_busy_seconds)",
)

# Ingestion and retrieval
INGESTED_DOCUMENTS = Counter(
    "sluice_ingested_documents", "Documents handled by ingestion, by outcome", ["outcome"]
)
INGESTED_CHUNKS = Counter("sluice_ingested_chunks", "Chunks embedded and written to the store")
INGEST_RETRIES = Counter(
    "sluice_ingest_retries", "Documents tried again after an embedder or store failure"
)
RETRIEVAL_LATENCY = Histogram(
    "sluice_retrieval_latency_seconds",
    "Query embedding + vector store search, per /retrieve or /rag-generate",
    ["mode"],
    buckets=_LATENCY_BUCKETS,
)

# Saturation: rate(busy) is the fraction of wall time the engine had work;
# rate(request_seconds) / rate(busy) is the mean number of requests in it while busy.
ENGINE_BUSY = Counter(
    "sluice_engine_busy_seconds", "Seconds during which the engine held at least one request"
)
ENGINE_REQUEST_SECONDS = Counter(
    "sluice_engine_request_seconds",
    "Time integral of the number of requests in the engine (running or queued inside it)",
)


def exposition() -> bytes:
    """This process's metrics, or, in multiprocess mode (several uvicorn workers), every API
    process's merged from PROMETHEUS_MULTIPROC_DIR: counters summed, gauges by their mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def sample_sums(names: Iterable[str]) -> dict[str, float]:
    """Each named sample summed over its label sets (e.g. vLLM's per-engine series), read from
    this process's registry; absent names read 0."""
    wanted = {name: 0.0 for name in names}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name in wanted:
                wanted[sample.name] += sample.value
    return wanted


def reported_lag(topic: str) -> int:
    """This process's `sluice_kafka_consumer_lag` summed over its partitions of `topic`."""
    total = 0.0
    for family in KAFKA_LAG.collect():
        total += sum(s.value for s in family.samples if s.labels["topic"] == topic)
    return int(total)


def serve_metrics(port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Expose the default registry (ours and vLLM's) on its own port, for processes without HTTP.

    Always the classic text format: asked for OpenMetrics (Prometheus asks first), this
    prometheus_client writes `vllm:x` as `vllm_x`, and vLLM's dashboards and our rules expect
    vLLM's own names. The API's /metrics is text format too."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = generate_latest()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per scrape is noise

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
