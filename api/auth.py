"""Who is calling: the API key (shared/apikeys.py) on every route that does work or reads data,
and which caller each request id belongs to.

Routes take `caller: CallerDep`; the /v1 router has it as a router dependency. Routes over
what all tenants share (the platform's cost, the document corpus) take `AdminDep`: a tenant's
key gets 403 there. With auth off (`sluice up`'s local mode) every caller is the anonymous
`default` tenant, without limits, and may do everything.
A request id is bound to the key that created it (`bind`, at enqueue); routes that act on an
id take it as `request_id: OwnedRequestId`, which answers 404, not 403, for another key's id,
so ids do not leak. With auth off there is one caller, who owns every request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import unavailable
from shared import apikeys, batch_auth, tracing
from shared.settings import Settings


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_id: str | None = None  # None: anonymous (auth is off)
    requests_per_min: int = 0  # 0: no limit
    tokens_per_min: int = 0
    admin: bool = False
    # The caller's W3C trace context, when it sent one: the request's spans join its trace.
    traceparent: str | None = None
    # The key's batch signing secret (shared/batch_auth.py): the Batch API signs the lines it
    # puts on the batch topic as the caller, so workers requiring signatures take them.
    signing_secret: str | None = field(default=None, repr=False)

    @property
    def limited(self) -> bool:
        return self.requests_per_min > 0 or self.tokens_per_min > 0


ANONYMOUS = Caller(tenant="default", admin=True)

# Declared as security schemes so the OpenAPI schema (and /docs) shows how to authenticate.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer sk-sluice-...`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key")


class Authenticator:
    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis

    async def caller(self, key: str | None) -> Caller:
        if not self.settings.auth_enabled:
            return ANONYMOUS
        if not key:
            raise _unauthorized(
                "missing API key: send `Authorization: Bearer sk-sluice-...` or `X-API-Key` "
                "(create one with `sluice keys create --tenant NAME`)"
            )
        try:
            record = await apikeys.lookup(self.redis, self.settings, key)
        except RedisError as e:
            raise unavailable("cannot check the API key now (Redis unavailable)", e) from e
        if record is None:
            raise _unauthorized("invalid API key")
        if record.revoked:
            raise _unauthorized(f"API key {record.key_id} has been revoked")
        return Caller(
            tenant=record.tenant,
            key_id=record.key_id,
            requests_per_min=_or_default(record.requests_per_min, self.settings.rate_limit_rpm),
            tokens_per_min=_or_default(record.tokens_per_min, self.settings.rate_limit_tpm),
            admin=record.admin,
            signing_secret=batch_auth.secret_for(key),
        )


async def require_caller(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> Caller:
    """The FastAPI dependency: the caller, or a 401 (503 if Redis cannot be asked)."""
    authenticator: Authenticator = request.app.state.auth
    caller = await authenticator.caller(bearer.credentials if bearer else api_key)
    if traceparent := request.headers.get(tracing.TRACEPARENT):
        caller = replace(caller, traceparent=traceparent)
    return caller


CallerDep = Annotated[Caller, Depends(require_caller)]


async def require_admin(caller: CallerDep) -> Caller:
    if not caller.admin:
        raise HTTPException(
            403,
            f"API key {caller.key_id} (tenant {caller.tenant}) is not an admin key: the "
            "platform's cost and the shared document corpus need one "
            "(`sluice keys create --tenant NAME --admin`)",
        )
    return caller


AdminDep = Annotated[Caller, Depends(require_admin)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def _or_default(own: int | None, default: int) -> int:
    return default if own is None else own


# --- Request ownership


def _owner_key(settings: Settings, request_id: str) -> str:
    return f"{settings.redis_prefix}:owner:{request_id}"


async def bind(redis: Redis, settings: Settings, request_id: str, caller: Caller) -> None:
    """Record that `caller` created `request_id`; kept as long as the request may run."""
    if caller.key_id is None:
        return  # auth is off: nobody to tell apart
    ttl_ms = math.ceil(settings.request_timeout_s * 1000)
    await redis.set(_owner_key(settings, request_id), caller.key_id, px=ttl_ms)


async def owns(redis: Redis, settings: Settings, request_id: str, caller: Caller) -> bool:
    """Whether `caller` created `request_id` (False for unknown or expired ids too). With auth
    off, the one caller owns every request, those producers put on Kafka directly too."""
    if caller.key_id is None:
        return True
    owner = await redis.get(_owner_key(settings, request_id))
    return owner is not None and owner.decode() == caller.key_id


async def owned_request(request_id: str, request: Request, caller: CallerDep) -> str:
    """The path's request id, if the caller created it: else a 404, as for an unknown id."""
    authenticator: Authenticator = request.app.state.auth
    try:
        mine = await owns(authenticator.redis, authenticator.settings, request_id, caller)
    except RedisError as e:
        raise unavailable("cannot check the request's owner now (Redis unavailable)", e) from e
    if not mine:
        raise HTTPException(404, f"no request {request_id}")
    return request_id


OwnedRequestId = Annotated[str, Depends(owned_request)]
