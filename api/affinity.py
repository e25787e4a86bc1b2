"""Prefix affinity: the Kafka message key of a request, so that requests sharing a prompt
prefix (one system prompt, one RAG template, one conversation) land on one partition, hence
one worker, whose engine has that prefix in its KV cache and prefills only the rest.

The key is a hash of the prompt's first `SLUICE_PREFIX_KEY_TOKENS` tokens, or of the caller's
`user` when given (a conversation grows past any fixed prefix; its user id does not change).
Kafka's partitioner maps equal keys to one partition; the partition's consumer is one worker.

A hot prefix must not pin all traffic on one worker while the others idle: this API process
keeps at most `SLUICE_AFFINITY_MAX_IN_FLIGHT` requests of one key in flight, and spills the
next to the key's next variant (`key:1`, `key:2`...: another partition, as the hash decides,
which then caches that prefix too). The count is per API process; with several replicas a hot
key may take `replicas x bound` before it spills.

`SLUICE_PARTITION_KEY=request` keys by request id instead: an even spread, no affinity.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter

from shared.settings import Settings


def prefix_hash(prompt_ids: list[int], tokens: int) -> str:
    return hashlib.blake2b(array("q", prompt_ids[:tokens]).tobytes(), digest_size=8).hexdigest()


def user_hash(tenant: str, user: str) -> str:
    return hashlib.blake2b(f"{tenant}\0{user}".encode(), digest_size=8).hexdigest()


class Affinity:
    """One pool's keys in flight from this process, to bound the spill-over."""

    def __init__(self, settings: Settings) -> None:
        self.by_prefix = settings.partition_key == "prefix"
        self.tokens = settings.prefix_key_tokens
        self.bound = settings.affinity_max_in_flight
        self._in_flight: Counter[str] = Counter()
        self._keys: dict[str, str] = {}  # request id -> the key it was sent with

    def affinity(self, prompt_ids: list[int], tenant: str, user: str | None) -> str:
        """What the request's key derives from; empty when keys are request ids."""
        if not self.by_prefix:
            return ""
        return user_hash(tenant, user) if user else prefix_hash(prompt_ids, self.tokens)

    def claim(self, request_id: str, affinity: str) -> str:
        """The key to send `request_id` with: its affinity's first variant below the bound."""
        if not affinity:
            return request_id
        spill = 0
        key = affinity
        while self._in_flight[key] >= self.bound:
            spill += 1
            key = f"{affinity}:{spill}"
        self._in_flight[key] += 1
        self._keys[request_id] = key
        return key

    def release(self, request_id: str) -> None:
        key = self._keys.pop(request_id, None)
        if key is not None:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]
