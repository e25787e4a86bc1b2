#!/usr/bin/env python3
"""Health checks for the Sluice images: Docker HEALTHCHECK, Compose and Kubernetes exec probes.

    sluice-healthcheck api            GET /health on SLUICE_PORT: the API process serves HTTP
    sluice-healthcheck api --ready    GET /ready: Kafka, Redis and at least one live worker
    sluice-healthcheck worker         the worker's /metrics answers AND lists vLLM's own metrics
    sluice-healthcheck worker --alive the worker's /metrics answers (process alive)
    sluice-healthcheck ingestion      GET /metrics on SLUICE_INGESTION_METRICS_PORT

Why the worker check looks inside /metrics: the worker starts its metrics server first and only
then loads the model (minutes for a 7B model), so "/metrics answers" says nothing about the engine.
vLLM registers its `vllm:*` metrics only once the engine has started (checked: none before
`AsyncLLM.from_engine_args` returns, 374 lines after), so their presence means "engine loaded".
With SLUICE_ENGINE=transformers there are no vLLM metrics and the check falls back to --alive.

Standard library only: a probe that imported the app would take seconds and hundreds of MB.
Exit status 0 healthy, 1 not (what Docker and Kubernetes expect).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        if response.status != 200:
            raise OSError(f"{url}: HTTP {response.status}")
        return response.read()


def check(role: str, ready: bool = False, alive: bool = False) -> str:
    """Raise OSError if `role` is not healthy; otherwise return what was checked."""
    if role == "api":
        port = _port("SLUICE_PORT", 8000)
        url = f"http://127.0.0.1:{port}/{'ready' if ready else 'health'}"
        _get(url)
        return url
    if role == "worker":
        port = _port("SLUICE_WORKER_METRICS_PORT", 9101)
        if port == 0:
            raise OSError("SLUICE_WORKER_METRICS_PORT=0: the worker serves no /metrics to probe")
        url = f"http://127.0.0.1:{port}/metrics"
        body = _get(url)
        engine = os.environ.get("SLUICE_ENGINE", "vllm")
        if alive or engine != "vllm":
            return url
        if not (body.startswith(b"vllm:") or b"\nvllm:" in body):
            raise OSError(f"{url} answers but lists no vllm:* metrics: the engine is not up yet")
        return f"{url} (engine loaded)"
    if role == "ingestion":
        port = _port("SLUICE_INGESTION_METRICS_PORT", 9102)
        if port == 0:
            raise OSError("SLUICE_INGESTION_METRICS_PORT=0: ingestion serves no /metrics to probe")
        url = f"http://127.0.0.1:{port}/metrics"
        _get(url)
        return url
    raise ValueError(f"unknown role {role!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice-healthcheck", description=__doc__)
    parser.add_argument("role", choices=["api", "worker", "ingestion"])
    parser.add_argument("--ready", action="store_true", help="api: GET /ready instead of /health")
    parser.add_argument("--alive", action="store_true", help="worker: do not require the engine")
    args = parser.parse_args(argv)
    try:
        what = check(args.role, ready=args.ready, alive=args.alive)
    except (OSError, urllib.error.URLError) as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    print(f"healthy: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
