"""The API relays each token index and each character once, whatever is replayed to it."""

from __future__ import annotations

from api.streaming import Relayed
from shared.messages import Token, TokensEvent


def ev(*tokens: tuple[int, str, int]) -> TokensEvent:
    return TokensEvent(tokens=[Token(index=i, text=t, offset=o) for i, t, o in tokens])


def relay(relayed: Relayed, *events: TokensEvent) -> str:
    out = [relayed.fresh(e) for e in events]
    return "".join(t.text for e in out if e is not None for t in e.tokens)


def test_a_replayed_stream_adds_nothing() -> None:
    first = [ev((0, "Hel", 0)), ev((1, "lo", 3), (2, " world", 5))]
    r = Relayed()
    assert relay(r, *first) == "Hello world"
    assert relay(r, *first) == ""  # the stream backfill after a Redis reconnect


def test_a_regeneration_grouped_differently_is_trimmed_to_the_new_part() -> None:
    r = Relayed()
    # First worker: tokens 1 and 2 came as one delta, its text on the last one.
    assert relay(r, ev((0, "Hel", 0)), ev((1, "", 3), (2, "lo w", 3))) == "Hello w"
    # The request is redelivered and generated again, grouped otherwise: 2 and 3 together.
    again = [ev((0, "Hel", 0)), ev((1, "lo", 3)), ev((2, "", 5), (3, " world", 5))]
    assert relay(r, *again) == "orld"
    assert r.next_index == 4 and r.chars == len("Hello world")


def test_resume_after_an_index_relays_the_rest() -> None:
    r = Relayed()
    relay(r, ev((0, "a", 0), (1, "b", 1)))  # what the client saw (Last-Event-ID: 1)
    assert relay(r, ev((0, "a", 0), (1, "b", 1), (2, "c", 2))) == "c"


def test_tokens_without_offsets_dedupe_by_index() -> None:
    r = Relayed()
    old = TokensEvent(tokens=[Token(index=0, text="x"), Token(index=1, text="y")])
    assert relay(r, old, old) == "xy"
