"""`sluice up`'s supervision of the local stack: a process that exits is started again after a
backoff (a worker that crashed, ran out of memory or was killed by hand comes back and its
requests wait in Kafka meanwhile); the stack stops only when a process it cannot do without
(the API, a service it started) keeps exiting right after its start.

And before anything starts: every port the stack will listen on must be free, else one line
names the port and the process holding it (another `sluice up`: and how to stop it), instead
of a traceback from whichever process bound it second.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from shared import devstack

BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
STEADY_S = 120.0  # a process that ran this long is healthy again: its backoff starts over
GIVE_UP = 3  # quick exits in a row of a vital process before the stack stops


@dataclass
class Supervised:
    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    vital: bool  # the stack cannot serve without it
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_exits: int = 0
    due: float | None = None  # when to start it again


class Supervisor:
    def __init__(self, pids_file: Path) -> None:
        self.pids_file = pids_file
        self.processes: list[Supervised] = []

    def add(
        self, name: str, start: Callable[[], subprocess.Popen[bytes]], vital: bool = False
    ) -> None:
        """Start `name` now, and again whenever it exits."""
        entry = Supervised(name, start, vital)
        self._start(entry)
        self.processes.append(entry)
        self._write_pids()

    def check(self) -> str | None:
        """Schedule or make the restarts that are due; the name of a vital process that gave
        up (exited GIVE_UP times in a row within STEADY_S of its start), if any."""
        now = time.monotonic()
        for entry in self.processes:
            assert entry.proc is not None
            code = entry.proc.poll()
            if code is None:
                continue
            if entry.due is None:
                quick = now - entry.started_at < STEADY_S
                entry.quick_exits = entry.quick_exits + 1 if quick else 1
                if entry.vital and entry.quick_exits >= GIVE_UP:
                    return entry.name
                delay = BACKOFF_S[min(entry.quick_exits, len(BACKOFF_S)) - 1]
                print(f"{entry.name} exited (code {code}); again in {delay:g} s", flush=True)
                entry.due = now + delay
            elif now >= entry.due:
                devstack.kill_group(entry.proc)  # what it left behind (a vLLM engine core)
                self._start(entry)
                self._write_pids()
        return None

    def stop(self) -> None:
        """Stop everything, the last started first."""
        for entry in reversed(self.processes):
            if entry.proc is not None:
                devstack.stop(entry.proc)
        self.pids_file.unlink(missing_ok=True)

    def _start(self, entry: Supervised) -> None:
        entry.proc = entry.start()
        entry.started_at = time.monotonic()
        entry.due = None

    def _write_pids(self) -> None:
        pids = [os.getpid(), *(e.proc.pid for e in self.processes if e.proc is not None)]
        self.pids_file.write_text(json.dumps(pids))


def running_stack(pids_file: Path) -> int | None:
    """The pid of the `sluice up` that wrote `pids_file`, if it still runs."""
    try:
        supervisor = json.loads(pids_file.read_text())[0]
    except (OSError, ValueError, IndexError):
        return None
    return supervisor if psutil.pid_exists(supervisor) and supervisor != os.getpid() else None


def port_in_use(host: str, port: int, what: str, pids_file: Path) -> str | None:
    """None if `port` is free; else one line: which port, for what, who holds it, what to do."""
    if not devstack.port_open(host, port):
        return None
    holder = "another process"
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            if conn.pid is not None:
                try:
                    cmd = " ".join(psutil.Process(conn.pid).cmdline()[:4])
                except psutil.Error:
                    cmd = "?"
                holder = f"pid {conn.pid} ({cmd})"
            break
    hint = "stop it or choose another port"
    stack = running_stack(pids_file)
    if stack is not None:
        hint = f"another `sluice up` (pid {stack}) runs: stop it with `make stop` or `sluice down`"
    return f"port {port} ({what}) is in use by {holder}: {hint}"
