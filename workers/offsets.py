"""Which offsets are safe to commit when requests finish out of order.

A partition's committed offset may only move past a record once that record and every record
before it has finished: committing further would lose unfinished requests if this worker died.
"""

from __future__ import annotations

from aiokafka import TopicPartition


class OffsetTracker:
    def __init__(self) -> None:
        self._pending: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}  # one past the highest offset seen
        self._committed: dict[TopicPartition, int] = {}

    def started(self, tp: TopicPartition, offset: int) -> None:
        self._pending.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def finished(self, tp: TopicPartition, offset: int) -> None:
        pending = self._pending.get(tp)
        if pending is not None:
            pending.discard(offset)

    def in_flight(self) -> int:
        return sum(len(p) for p in self._pending.values())

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit now (Kafka's "next offset to read"), only where they moved."""
        ready = {}
        for tp, nxt in self._next.items():
            pending = self._pending.get(tp)
            offset = min(pending) if pending else nxt
            if offset > self._committed.get(tp, -1):
                ready[tp] = offset
        return ready

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drop partitions this worker no longer owns (after a rebalance)."""
        for tp in partitions:
            self._pending.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
