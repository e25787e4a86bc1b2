"""Run a parser on untrusted bytes in a child process, killed past a time limit.

A thread cannot be stopped: a PDF crafted to make pypdf loop would hold the consumer past its
poll interval, then the next consumer too. A child process can be killed. Children come from a
forkserver (a clean process, not a fork of this one with its threads and model weights), so
starting one costs tens of milliseconds.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

T = TypeVar("T")


class SandboxError(Exception):
    """The child ran out of time or died; `reason` is for people."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def run(fn: Callable[..., T], args: tuple[Any, ...], timeout_s: float) -> T:
    """`fn(*args)` in a child; its exception is raised here (it must pickle)."""
    context = multiprocessing.get_context("forkserver")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, fn, args), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise SandboxError(f"parsing took longer than {timeout_s:g} s")
        ok, value = receive.recv()
    except EOFError:
        raise SandboxError(f"the parser died (exit code {child.exitcode})") from None
    finally:
        child.kill()
        child.join()
        receive.close()
    if ok:
        return value
    raise value


def _child(send: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        result: tuple[bool, Any] = (True, fn(*args))
    except Exception as e:
        result = (False, e)
    send.send(result)
