"""Which pool serves a request: the catalog's models (shared/pools.py), each with its own
topics, its own tokenizer (validation counts the prompt's tokens) and context length, and its
own queue bound (api/backpressure.py counts only its workers and their lag).

Tokenizers are loaded when a model is first asked for, once per set of weights: pools of one
model in several configurations (fp32, INT8) share it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from api.affinity import Affinity
from api.backpressure import Admission
from api.streaming import StreamHub
from shared import pools
from shared.models import model_path
from shared.settings import Settings


@dataclass
class Served:
    settings: Settings  # the pool's: its topics, model, context length, queue bound
    tokenizer: Any
    admission: Admission
    token_chars: int  # the most characters one token stands for (a cheap length bound)
    affinity: Affinity  # its Kafka keys in flight (api/affinity.py)


def served(settings: Settings, tokenizer: Any, hub: StreamHub, default_topic: str) -> Served:
    # A token string has at least as many characters as the text it decodes to (byte-level
    # BPE, sentencepiece).
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    chars = max(map(len, vocab), default=1)
    admission = Admission(settings, hub, default_topic)
    return Served(settings, tokenizer, admission, chars, Affinity(settings))


class Router:
    def __init__(self, settings: Settings, default_tokenizer: Any, hub: StreamHub) -> None:
        self._settings = settings
        self._hub = hub
        topic = settings.requests_topic
        self._served = {settings.model: served(settings, default_tokenizer, hub, topic)}
        self._tokenizers = {self._weights(settings): default_tokenizer}
        self._loading = asyncio.Lock()

    @property
    def default(self) -> Served:
        return self._served[self._settings.model]

    def all(self) -> list[Served]:
        return list(self._served.values())

    async def get(self, model: str | None) -> Served:
        """The pool of `model` (None: the default one; an adapter: its base model's);
        UnknownModel if none serves it."""
        name = pools.base_of(self._settings, model or self._settings.model)
        if name in self._served:
            return self._served[name]
        pool = pools.pool_settings(self._settings, name)  # UnknownModel
        async with self._loading:
            if name not in self._served:
                weights = self._weights(pool)
                if weights not in self._tokenizers:
                    self._tokenizers[weights] = await asyncio.to_thread(_tokenizer, weights)
                tokenizer, topic = self._tokenizers[weights], self._settings.requests_topic
                self._served[name] = served(pool, tokenizer, self._hub, topic)
        return self._served[name]

    def release(self, request_id: str) -> None:
        """The request ended: no longer its tenant's in its pool's admission, nor in flight
        under its key."""
        for pool in self._served.values():
            pool.admission.release(request_id)
            pool.affinity.release(request_id)

    def _weights(self, settings: Settings) -> str:
        try:
            return model_path(settings)
        except Exception:  # not prepared (tests without a model): one key for all
            return settings.model_weights or settings.model


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
