"""API keys: created and revoked with `sluice keys`, checked by the API (api/auth.py).

A key is `sk-sluice-` and 32 random URL-safe characters. Only its SHA-256 is stored, so a copy
of Redis gives nobody a usable key; the plaintext is shown once, at creation. Records live at
`{prefix}:apikey:<sha256>`; `{prefix}:apikey-id:<key_id>` points a key's short public id at its
hash (to revoke by id), and the set `{prefix}:apikeys` lists the hashes (no SCAN to list).
A key's batch signing secret (shared/batch_auth.py) is stored apart, for workers to read.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from shared import batch_auth
from shared.settings import Settings

KEY_PREFIX = "sk-sluice-"
# Tenants become Prometheus label values and ledger keys: a conservative alphabet.
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ApiKey(BaseModel):
    key_id: str
    tenant: str = Field(..., pattern=TENANT_PATTERN)
    created: float
    revoked: bool = False
    # None: the settings' default (SLUICE_RATE_LIMIT_RPM / _TPM); 0: unlimited
    requests_per_min: int | None = Field(None, ge=0)
    tokens_per_min: int | None = Field(None, ge=0)
    # Operators' keys: they may read the platform's cost (every tenant's) and change the one
    # document corpus all tenants retrieve from; tenants' keys may not.
    admin: bool = False


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def _record_key(settings: Settings, digest: str) -> str:
    return f"{settings.redis_prefix}:apikey:{digest}"


def _id_key(settings: Settings, key_id: str) -> str:
    return f"{settings.redis_prefix}:apikey-id:{key_id}"


def _index_key(settings: Settings) -> str:
    return f"{settings.redis_prefix}:apikeys"


async def create(
    redis: Redis,
    settings: Settings,
    tenant: str,
    requests_per_min: int | None = None,
    tokens_per_min: int | None = None,
    admin: bool = False,
) -> tuple[str, ApiKey]:
    """A new key: (its plaintext, which is not stored anywhere, and its record)."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(24)  # 24 bytes: 32 characters
    digest = hash_key(plaintext)
    record = ApiKey(
        key_id=batch_auth.key_id(plaintext),
        tenant=tenant,
        created=time.time(),
        requests_per_min=requests_per_min,
        tokens_per_min=tokens_per_min,
        admin=admin,
    )
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(_record_key(settings, digest), record.model_dump_json())
        pipe.set(_id_key(settings, record.key_id), digest)
        pipe.sadd(_index_key(settings), digest)
        pipe.set(batch_auth.signer_key(settings, record.key_id), _signer(record, plaintext))
        await pipe.execute()
    return plaintext, record


def _signer(record: ApiKey, plaintext: str) -> str:
    secret = batch_auth.secret_for(plaintext)
    signer = batch_auth.Signer(key_id=record.key_id, tenant=record.tenant, secret=secret)
    return signer.model_dump_json()


async def lookup(redis: Redis, settings: Settings, plaintext: str) -> ApiKey | None:
    """The key's record (revoked ones too: the caller says why it refuses), or None."""
    if not plaintext.startswith(KEY_PREFIX):
        return None  # not ours: no Redis round trip
    digest = hash_key(plaintext)
    raw = await redis.get(_record_key(settings, digest))
    if raw is None:
        return None
    return ApiKey.model_validate_json(raw)


async def list_keys(redis: Redis, settings: Settings) -> list[ApiKey]:
    digests = sorted(d.decode() for d in await redis.smembers(_index_key(settings)))
    if not digests:
        return []
    raws = await redis.mget([_record_key(settings, d) for d in digests])
    records = [ApiKey.model_validate_json(raw) for raw in raws if raw]
    return sorted(records, key=lambda r: r.created)


async def revoke(redis: Redis, settings: Settings, key_id: str) -> ApiKey | None:
    """Mark the key revoked (the record stays, so `keys list` shows it); None if unknown."""
    digest = await redis.get(_id_key(settings, key_id))
    if digest is None:
        return None
    key = _record_key(settings, digest.decode())
    raw = await redis.get(key)
    if raw is None:
        return None
    record = ApiKey.model_validate_json(raw).model_copy(update={"revoked": True})
    await redis.set(key, record.model_dump_json())
    # Its batch signatures stop being accepted too (workers cache signers for a few seconds).
    signer_key = batch_auth.signer_key(settings, key_id)
    signer = await redis.get(signer_key)
    if signer is not None:
        revoked = batch_auth.Signer.model_validate_json(signer).model_copy(update={"revoked": True})
        await redis.set(signer_key, revoked.model_dump_json())
    return record
