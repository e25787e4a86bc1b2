"""Several uvicorn processes behind one port: /metrics counts every request exactly once,
whichever process serves the request or the scrape."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from shared import devstack
from shared.devstack import LocalStack
from tests.conftest import LOG_DIR, Services, make_settings

N = 60


@pytest.fixture
def two_process_api(services: Services, model_ready: None, tmp_path: Path) -> Iterator[str]:
    settings = make_settings(services, port=devstack.free_port(), api_workers=2)
    stack = LocalStack(settings, LOG_DIR / "multiprocess")
    stack.env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    stack.start_api()
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{stack.url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert stack.api is not None and stack.api.poll() is None, "API exited; see its log"
        assert time.monotonic() < deadline, "API not up"
        time.sleep(0.5)
    # Both processes must be up before counting, or one would serve everything.
    time.sleep(5)
    try:
        yield stack.url
    finally:
        stack.stop()


def health_count(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("sluice_requests_total{") and 'endpoint="/health"' in line:
            if 'status="200"' in line:
                return float(line.split()[-1])
    return 0.0


def test_requests_are_counted_once_across_processes(two_process_api: str, tmp_path: Path) -> None:
    before = health_count(httpx.get(f"{two_process_api}/metrics").text)
    for _ in range(N):
        # A new connection each time, so the kernel spreads them over both processes.
        assert httpx.get(f"{two_process_api}/health").status_code == 200
    scrapes = [health_count(httpx.get(f"{two_process_api}/metrics").text) for _ in range(6)]
    assert scrapes == [before + N] * 6
    # Proof that more than one process served (and counted) some of them.
    served = {path.stem: health_in_file(path) for path in tmp_path.glob("counter_*.db")}
    assert sum(served.values()) == before + N
    assert sum(1 for n in served.values() if n > 0) >= 2, served


def health_in_file(path: Path) -> float:
    """One process's /health count, from its own prometheus_client value file."""
    total = 0.0
    for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
        _, name, labels, _ = json.loads(key)
        if name == "sluice_requests_total" and labels == {"endpoint": "/health", "status": "200"}:
            total += value
    return total
