"""What each request cost: engine time shared out among the requests batched together.

Wall time per request would double count under batching (16 requests in one step each "used"
the whole step). Instead, every interval of engine time is split among the requests by their
share of the tokens the engine produced in it (a request's prompt counts once, when its first
token shows it was prefilled). Time in which no tokens came out (a long prefill) is carried to
the next interval that has some. So the requests' shares add up to the engine's busy time.

    cost = attributed engine seconds x instance $/h x (1 - spot discount) / GPUs per instance
"""

from __future__ import annotations

import time

from shared import metrics
from shared.settings import Settings


class CostMeter:
    def __init__(self, settings: Settings, model: str) -> None:
        hourly = settings.instance_hourly_usd * (1 - settings.spot_discount)
        self.dollars_per_second = hourly / settings.gpus_per_instance / 3600
        self.model = model
        self._seconds: dict[str, float] = {}  # engine seconds attributed so far, per request
        self._tokens: dict[str, int] = {}  # tokens since the last tick, per request
        self._carried = 0.0
        self._last = time.monotonic()

    def start(self, rid: str) -> None:
        self.tick()  # time before this request arrived is not its to pay
        self._seconds[rid] = 0.0

    def tokens(self, rid: str, n: int) -> None:
        if rid in self._seconds:
            self._tokens[rid] = self._tokens.get(rid, 0) + n

    def tick(self) -> None:
        """Share out the engine time since the last tick (called every ~100 ms and whenever a
        request starts or ends)."""
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        if not self._seconds:
            self._carried = 0.0
            return
        self._carried += elapsed
        total = sum(self._tokens.values())
        if total == 0:
            return
        for rid, n in self._tokens.items():
            self._seconds[rid] += self._carried * n / total
        self._tokens.clear()
        self._carried = 0.0

    def spent(self, rid: str) -> float:
        """Engine seconds attributed to a running request so far."""
        return self._seconds.get(rid, 0.0)

    def finish(
        self, rid: str, tenant: str = "default", model: str | None = None
    ) -> tuple[float, float]:
        """(engine seconds, dollars) of a finished request; also exported as metrics, under
        `model` (an adapter's name) or the pool's."""
        self.tick()
        seconds = self._seconds.pop(rid, 0.0)
        self._tokens.pop(rid, None)
        dollars = seconds * self.dollars_per_second
        metrics.REQUEST_COST.observe(dollars)
        metrics.COST_TOTAL.labels(model or self.model, tenant).inc(dollars)
        metrics.ENGINE_ATTRIBUTED.inc(seconds)
        return seconds, dollars

    def discard(self, rid: str) -> None:
        """Forget a request that ended without finishing (cancelled at shutdown)."""
        self._seconds.pop(rid, None)
        self._tokens.pop(rid, None)
