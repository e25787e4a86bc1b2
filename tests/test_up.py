"""`sluice up` as a new user runs it: it supervises (a worker killed with SIGKILL comes back
and serves), refuses a second stack in one line instead of a traceback (and leaves the first
one's pid file alone), and Ctrl-C leaves no process behind and every port free."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from shared import devstack
from shared.devstack import settings_env
from tests.conftest import Services, make_settings

pytestmark = pytest.mark.stack

SLUICE = [sys.executable, "-m", "cli"]
ROOT = Path(__file__).resolve().parent.parent


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s"
        time.sleep(0.5)


def worker_served(url: str) -> str:
    r = httpx.post(f"{url}/generate", json={"prompt": "Hi", "max_tokens": 4}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["worker_id"]


def test_up_restarts_a_killed_worker_refuses_a_second_stack_and_stops_clean(
    services: Services, tmp_path: Path, model_ready: None
) -> None:
    broker = devstack.free_port()
    settings = make_settings(
        services, port=devstack.free_port(), kafka=f"127.0.0.1:{broker}",
        worker_metrics_port=devstack.free_port(), ingestion_metrics_port=devstack.free_port(),
    )  # fmt: skip
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
    url = f"http://{settings.host}:{settings.port}"
    up = subprocess.Popen(
        [*SLUICE, "up"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(up.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    started: list[psutil.Process] = []
    try:
        wait_for(lambda: any("Sluice is ready" in line for line in lines), 600, "ready stack")
        started = psutil.Process(up.pid).children(recursive=True)
        pids_file = tmp_path / ".run" / "pids.json"
        pids = json.loads(pids_file.read_text())
        assert pids[0] == up.pid

        # A second `sluice up` here is refused in one line; the first stack's pid file stays.
        second = subprocess.run([*SLUICE, "up"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        assert second.returncode != 0
        assert f"another `sluice up` (pid {up.pid})" in second.stderr
        assert "make stop" in second.stderr
        assert json.loads(pids_file.read_text()) == pids
        # From another directory: the API's port is taken, by whom, and how to stop it.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        third = subprocess.run([*SLUICE, "up"], cwd=elsewhere, env=env, capture_output=True,
                               text=True, timeout=120)  # fmt: skip
        assert third.returncode != 0 and f"port {settings.port} (the API) is in use" in third.stderr
        assert len(third.stderr.strip().splitlines()) == 1, third.stderr

        # Supervision: the worker, killed with its engine, is started again and serves.
        first = worker_served(url)
        [worker] = [p for p in psutil.Process(up.pid).children() if "worker" in p.cmdline()]
        os.killpg(worker.pid, signal.SIGKILL)
        wait_for(lambda: any("worker-0 exited" in line for line in lines), 30, "exit notice")
        deadline = time.monotonic() + 300
        while (served := worker_served(url)) == first:
            assert time.monotonic() < deadline, "the killed worker was not replaced"
        assert served != first and str(worker.pid) not in served

        # Ctrl-C: everything stops, nothing is left, every port is free.
        everything = started = psutil.Process(up.pid).children(recursive=True)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0
        assert all(gone(p.pid) for p in everything), [p.pid for p in everything if not gone(p.pid)]
        ports = (settings.port, settings.worker_metrics_port, settings.ingestion_metrics_port,
                 broker)  # fmt: skip
        assert [p for p in ports if devstack.port_open("127.0.0.1", p)] == []
        assert not pids_file.exists()
    finally:  # whatever failed above, leave nothing running
        if up.poll() is None:
            up.kill()
        for proc in started:
            if not gone(proc.pid):
                proc.kill()
