"""Per-key rate limits in Redis: requests and tokens per minute, over a sliding window.

Each key has one sorted set of its admissions in the last minute (score: Redis time in ms,
member: `<request id>:<tokens>`). One Lua script drops what left the window, checks both limits
and records the admission only if both pass, atomically, so concurrent API processes cannot
overshoot, and a refused request costs the caller nothing. The window slides (a log, not fixed
minutes), so a burst at a minute boundary cannot get twice the limit, and `Retry-After` is the
exact time until enough of the window has expired.

A retrieval (`/retrieve`, and the retrieval of `/rag-generate`) is admitted as one request of
0 tokens under its request id; when `/rag-generate` then admits its generation under the same
id, that admission replaces the retrieval's: one call, one request, refused before it touches
the vector store when the key is over its limit.
"""

from __future__ import annotations

import math

from fastapi import HTTPException
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.auth import Caller
from api.errors import unavailable
from shared.settings import Settings

WINDOW_MS = 60_000

# Redis' own clock, so every API process measures the window alike.
_ADMIT = """
local window, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, member = tonumber(ARGV[4]), ARGV[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
-- this request's retrieval, admitted before it: replaced by this admission, kept if refused
local retrieval = member .. ':0'
local held = tokens > 0 and redis.call('ZSCORE', KEYS[1], retrieval)
if held then redis.call('ZREM', KEYS[1], retrieval) end
local function refuse(limit, wait)
  if held then redis.call('ZADD', KEYS[1], held, retrieval) end
  return {limit, wait}
end
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local n = #entries / 2
if rpm > 0 and n >= rpm then
  -- the (n - rpm + 1)th oldest admission has to leave the window first
  return refuse('requests', tonumber(entries[(n - rpm) * 2 + 2]) + window - now)
end
if tpm > 0 then
  if tokens > tpm then
    return refuse('tokens', -1)
  end
  local used, sizes = 0, {}
  for i = 1, #entries, 2 do
    local size = tonumber(string.match(entries[i], ':(%d+)$'))
    sizes[#sizes + 1] = size
    used = used + size
  end
  if used + tokens > tpm then
    for i = 1, #sizes do
      used = used - sizes[i]
      if used + tokens <= tpm then
        return refuse('tokens', tonumber(entries[i * 2]) + window - now)
      end
    end
  end
end
redis.call('ZADD', KEYS[1], now, member .. ':' .. tokens)
redis.call('PEXPIRE', KEYS[1], window)
return {'ok', 0}
"""


class RateLimiter:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.settings = settings
        self._redis = redis
        self._admit = redis.register_script(_ADMIT)

    async def admit(self, caller: Caller, request_id: str, tokens: int) -> None:
        """Count one request of `tokens` (prompt + max_tokens) against the caller's limits, or
        raise a 429 with `Retry-After` naming the limit reached."""
        if not caller.limited:
            return
        key = f"{self.settings.redis_prefix}:ratelimit:{caller.key_id}"
        args = [WINDOW_MS, caller.requests_per_min, caller.tokens_per_min, tokens, request_id]
        try:
            limit, wait_ms = await self._admit(keys=[key], args=args)
        except RedisError as e:
            raise unavailable("cannot check the rate limit now (Redis unavailable)", e) from e
        if limit == b"requests":
            what = f"{caller.requests_per_min} requests per minute"
        elif limit == b"tokens" and wait_ms < 0:
            raise HTTPException(429, _never_fits(caller, tokens))
        elif limit == b"tokens":
            what = (
                f"{caller.tokens_per_min} tokens per minute "
                f"(this request counts {tokens}: prompt + max_tokens)"
            )
        else:
            return
        retry_s = max(1, math.ceil(wait_ms / 1000))
        raise HTTPException(
            429,
            f"rate limit of API key {caller.key_id} reached: {what}; retry in {retry_s} s",
            headers={"Retry-After": str(retry_s)},
        )

    async def refund(self, caller: Caller, request_id: str, tokens: int) -> None:
        """Take back an admission that was then refused for another reason (capacity)."""
        if caller.limited:
            key = f"{self.settings.redis_prefix}:ratelimit:{caller.key_id}"
            await self._redis.zrem(key, f"{request_id}:{tokens}")


def _never_fits(caller: Caller, tokens: int) -> str:
    # No Retry-After: waiting cannot help, so clients should not retry it.
    return (
        f"this request counts {tokens} tokens (prompt + max_tokens), more than the "
        f"{caller.tokens_per_min} tokens per minute of API key {caller.key_id}: "
        "lower max_tokens or shorten the prompt"
    )
