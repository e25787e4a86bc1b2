"""One settings object for every Sluice process, read from SLUICE_* environment variables.

Every variable is documented in `.env.example`; keep the two in step.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", env_file=".env", extra="ignore")

    # Connections
    kafka: str = "127.0.0.1:9092"
    redis: str = "redis://127.0.0.1:6379/0"
    # Prefix of every Redis key and channel, so several stacks can share one Redis.
    redis_prefix: str = "sluice"
    # Real Kafka supports idempotent producers; the dev broker (Tansu) does not.
    kafka_idempotence: bool = False
    # Tansu does not wake a waiting fetch when data arrives, so this bounds the queue latency
    # there; real Kafka answers a fetch as soon as data arrives: raise it (e.g. 500) to poll less.
    kafka_fetch_max_wait_ms: int = Field(50, ge=0)

    # Topics and consumer group
    requests_topic: str = "sluice.requests"
    requests_partitions: int = Field(8, ge=1)
    consumer_group: str = "sluice-workers"

    # Model and limits shared by the API (validation) and the workers (engine)
    model: str = DEFAULT_MODEL
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

    # Worker
    worker_id: str = Field(default_factory=_default_worker_id)
    poll_max_records: int = Field(32, ge=1)
    poll_timeout_ms: int = Field(20, ge=0)
    max_in_flight: int = Field(64, ge=1)
    stream_interval_ms: int = Field(20, ge=0)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    heartbeat_ttl_s: float = Field(5.0, gt=0)
    worker_metrics_port: int = Field(9101, ge=0)

    # API
    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout_s: float = Field(300.0, gt=0)

    @property
    def dlq_topic(self) -> str:
        return f"{self.requests_topic}.dlq"

    def stream_channel(self, request_id: str) -> str:
        return f"{self.redis_prefix}:stream:{request_id}"

    def heartbeat_key(self, worker_id: str) -> str:
        return f"{self.redis_prefix}:worker:{worker_id}"
