"""Which tenant a batch message is from, by its signature (shared/batch_auth.py).

The worker reads signers from Redis (`{prefix}:batch-signer:<key_id>`) and keeps each for
CACHE_S, so a key revoked with `sluice keys revoke` stops signing within that time.
"""

from __future__ import annotations

import time

from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis

from shared import batch_auth
from shared.messages import GenerationRequest
from shared.settings import Settings

CACHE_S = 10.0


class Forged(Exception):
    """The message may not be run: why goes to the DLQ."""


class Signers:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._cache: dict[str, tuple[float, batch_auth.Signer | None]] = {}

    async def verified(
        self, record: ConsumerRecord, request: GenerationRequest
    ) -> GenerationRequest:
        """The request with the signing key's tenant; raises Forged. Unsigned messages pass as
        they are unless signatures are required (RedisError propagates: nothing is decided)."""
        headers = dict(record.headers or ())
        key_id = headers.get(batch_auth.KEY_ID_HEADER, b"").decode(errors="replace")
        claimed = headers.get(batch_auth.SIGNATURE_HEADER, b"").decode(errors="replace")
        if not key_id and not claimed:
            if self.settings.batch_require_signature:
                raise Forged(f"unsigned: this deployment requires {batch_auth.SIGNATURE_HEADER}")
            return request
        signer = await self._signer(key_id)
        if signer is None:
            raise Forged(f"{batch_auth.KEY_ID_HEADER}: no key {key_id[:16]!r}")
        if signer.revoked:
            raise Forged(f"{batch_auth.KEY_ID_HEADER}: key {key_id} is revoked")
        if not batch_auth.matches(signer, record.value or b"", claimed):
            raise Forged(f"{batch_auth.SIGNATURE_HEADER}: does not match the message")
        if request.tenant not in (None, signer.tenant):
            raise Forged(f"tenant: {request.tenant!r} is not the signing key's tenant")
        return request.model_copy(update={"tenant": signer.tenant})

    async def _signer(self, key_id: str) -> batch_auth.Signer | None:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < CACHE_S:
            return cached[1]
        raw = await self.redis.get(batch_auth.signer_key(self.settings, key_id)) if key_id else None
        signer = batch_auth.Signer.model_validate_json(raw) if raw else None
        if len(self._cache) > 10_000:  # unknown ids are cached too: bound what a flood leaves
            self._cache.clear()
        self._cache[key_id] = (now, signer)
        return signer
