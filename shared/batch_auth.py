"""Who a batch message is from: signatures the worker verifies, and a results topic per tenant.

A Kafka consumer never learns which principal produced a record, so the `tenant` field of a
batch request is only a claim. A submitter holding an API key signs each message: an HMAC-SHA256
of the exact message bytes, keyed with a secret derived from its API key, in the headers
`sluice.key-id` and `sluice.signature`. `sluice keys create` stores that secret (not the key) at
`{prefix}:batch-signer:<key_id>`, the one thing about keys a worker may read. The worker checks
the signature and takes the tenant from the key, so a submitter cannot bill another tenant; with
`SLUICE_BATCH_REQUIRE_SIGNATURE` on (a secured deployment), unsigned messages are dead-lettered.

Results of a request with a tenant go to `{batch_results_topic}.{tenant}`, those without one to
the shared topic, so Kafka ACLs can give each tenant read access to its own results only.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import BaseModel

from shared.settings import Settings

KEY_ID_HEADER = "sluice.key-id"
SIGNATURE_HEADER = "sluice.signature"
_DERIVATION = b"sluice batch signing v1"


class Signer(BaseModel):
    """What a worker needs to check a key's signatures; never the key itself."""

    key_id: str
    tenant: str
    secret: str
    revoked: bool = False


def secret_for(api_key: str) -> str:
    """The signing secret of an API key. Derived, so a submitter needs only its key, and a copy
    of Redis lets nobody call the API (it can still forge batch messages: keep Redis closed)."""
    return hmac.new(api_key.encode(), _DERIVATION, hashlib.sha256).hexdigest()


def signature(secret: str, value: bytes) -> str:
    return hmac.new(secret.encode(), value, hashlib.sha256).hexdigest()


def sign(api_key: str, value: bytes) -> list[tuple[str, bytes]]:
    """The headers to produce `value` with."""
    return signed_by(key_id(api_key), secret_for(api_key), value)


def signed_by(key_id: str, secret: str, value: bytes) -> list[tuple[str, bytes]]:
    """`sign` for one who holds the key's id and secret, not the key (the API, for a caller)."""
    return [(KEY_ID_HEADER, key_id.encode()), (SIGNATURE_HEADER, signature(secret, value).encode())]


def key_id(api_key: str) -> str:
    """A key's public id (as `sluice keys list` shows it)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def matches(signer: Signer, value: bytes, claimed: str) -> bool:
    return hmac.compare_digest(signature(signer.secret, value), claimed)


def signer_key(settings: Settings, key_id: str) -> str:
    return f"{settings.redis_prefix}:batch-signer:{key_id}"


def results_topic(settings: Settings, tenant: str | None) -> str:
    if tenant is None:
        return settings.batch_results_topic
    return f"{settings.batch_results_topic}.{tenant}"
