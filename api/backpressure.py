"""Admission control: beyond what the workers can soon serve, answer 429 instead of queueing
without limit.

The backlog is what waits in Kafka (each worker's heartbeat carries the lag of its partitions)
plus what this API admitted after the oldest of those heartbeats was measured: heartbeats and
lag are each up to a second old, and a flood arrives faster than that. A second bound, on this
process's open requests, keeps its memory bounded whatever the workers report.

A full queue is shared between tenants: past the bound, a tenant is still admitted while it
holds fewer than its share (the bound over the number of tenants holding requests) of this
process's open requests, so one tenant's flood cannot lock the others out, and the queue
overshoots the bound by at most the bound. Shares are per API process: with several replicas,
each applies them to the requests it holds. Open requests count while queued or running.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque

from fastapi import HTTPException

from api.streaming import StreamHub
from shared import redis as sredis
from shared.settings import Settings

log = logging.getLogger(__name__)

REFRESH_S = 0.5
LAG_AGE_S = 1.0  # the worker measures lag about once a second, before its heartbeat


class Admission:
    def __init__(
        self, settings: Settings, hub: StreamHub, default_topic: str | None = None
    ) -> None:
        """`settings`: its model pool's; `default_topic`: the default pool's requests topic,
        which workers from before pools read (None: this pool's)."""
        self._settings = settings
        self._default_topic = default_topic or settings.requests_topic
        self._hub = hub
        self._read_at = 0.0
        self._lag = 0
        self._workers = 0
        self._measured_at = 0.0  # unix time the oldest heartbeat's lag may date from
        self._admitted: deque[float] = deque()  # unix times of recent admissions
        self._tenant_of: dict[str, str] = {}  # request id -> tenant, until release()
        self._holding: Counter[str] = Counter()  # tenant -> its open requests here

    async def check(self, tenant: str, request_id: str) -> None:
        """Raise 429 (with Retry-After) if this request should not be queued now; otherwise it
        counts as the tenant's until `release`."""
        await self._refresh()
        s = self._settings
        if self._hub.open_count() >= s.max_open_requests:
            raise _busy(f"this API holds {s.max_open_requests} open requests", 1)
        now = time.time()
        while self._admitted and self._admitted[0] < self._measured_at:
            self._admitted.popleft()  # already in the workers' lag
        backlog = self._lag + len(self._admitted)
        # No live worker still queues a little: that backlog is what scales workers up from zero.
        limit = max(self._workers, 1) * s.max_queued_per_worker
        if backlog >= limit and not self._under_share(tenant, limit):
            # Roughly the time for the workers to take in what is ahead, at full batches.
            per_round = max(self._workers, 1) * s.max_in_flight
            raise _busy(f"{backlog} requests are queued", math.ceil(backlog / per_round))
        self._admitted.append(now)
        self._tenant_of[request_id] = tenant
        self._holding[tenant] += 1

    def waiting(self) -> tuple[int, int]:
        """The pool's backlog (as last read, plus admissions since) and its live workers."""
        return self._lag + len(self._admitted), self._workers

    def release(self, request_id: str) -> None:
        """The request ended (or was never enqueued): no longer its tenant's."""
        tenant = self._tenant_of.pop(request_id, None)
        if tenant is not None:
            self._holding[tenant] -= 1
            if self._holding[tenant] <= 0:
                del self._holding[tenant]

    def _under_share(self, tenant: str, limit: int) -> bool:
        tenants = len(self._holding.keys() | {tenant})
        return tenants > 1 and self._holding[tenant] < limit / tenants

    async def _refresh(self) -> None:
        if time.monotonic() - self._read_at < REFRESH_S:
            return
        self._read_at = time.monotonic()
        try:
            beats = await sredis.live_workers(self._hub.redis, self._settings)
        except Exception as e:  # Redis down: enqueueing fails anyway; keep the last view
            log.warning("backpressure: heartbeats unreadable: %s", e)
            return
        # This model's pool only; its batch-only workers take none of these requests.
        topic, default = self._settings.requests_topic, self._default_topic
        beats = [b for b in beats if b.interactive and b.serves(topic, default)]
        self._lag = sum(b.lag for b in beats)
        self._workers = len(beats)
        # With no worker nobody measures the lag: every admission counts until one appears.
        self._measured_at = min((b.ts - LAG_AGE_S for b in beats), default=0.0)


def _busy(why: str, retry_after_s: int) -> HTTPException:
    retry = min(max(retry_after_s, 1), 60)
    return HTTPException(
        429,
        f"Sluice is at capacity ({why}); retry after {retry} s",
        headers={"Retry-After": str(retry)},
    )
