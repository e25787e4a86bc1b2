from aiokafka import TopicPartition

from workers.offsets import OffsetTracker

TP = TopicPartition("t", 0)


def test_commits_only_the_finished_prefix() -> None:
    t = OffsetTracker()
    for offset in (10, 11, 12):
        t.started(TP, offset)
    assert t.committable() == {TP: 10}  # nothing finished: the first unfinished one
    t.mark_committed({TP: 10})
    t.finished(TP, 11)
    assert t.committable() == {}  # 10 still runs: 11 must not be committed past it
    t.finished(TP, 10)
    assert t.committable() == {TP: 12}
    t.mark_committed({TP: 12})
    t.finished(TP, 12)
    assert t.committable() == {TP: 13}
    assert t.in_flight() == 0


def test_forgotten_partitions_are_not_committed() -> None:
    t = OffsetTracker()
    other = TopicPartition("t", 1)
    t.started(TP, 0)
    t.started(other, 5)
    t.forget({other})
    t.finished(other, 5)  # a request of a revoked partition finishing later is harmless
    assert t.committable() == {TP: 0}
