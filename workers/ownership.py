"""Who runs a request: one live owner at a time, fenced by an epoch, taken over within seconds.

Kafka decides which worker *reads* a record; this module decides which worker *runs* it. Each
request has a record in Redis (`{prefix}:req:{id}`, a hash): its message, its state (running or
done), its owner, an epoch, and the token ids already published (`{prefix}:ids:{id}`). Every
change is one Lua script, so it is atomic:

- `claim_new`: the first worker to read a request's Kafka record becomes its owner (epoch 1).
  A later reader (a redelivery after a rebalance among live workers, or after a migration)
  finds the record and does not run it again: it only waits for `done` to commit the offset.
- `publish` (workers/publisher.py): tokens and the terminal event go out only while the
  caller's epoch is the request's epoch; the same script appends the token ids, so the ids
  kept are exactly what a client may have seen. A terminal event sets `done`. If Redis lost
  the record (a cold restart), the owner writes it again (`reclaim`) and publishes on.
- Death: a worker whose heartbeat is older than `worker_dead_after_s` is dead; any live worker
  moves its requests to the orphan set (`orphan_dead`). A worker may also hand its own requests
  over (`release`: drain bound reached, engine died).
- `claim_orphan`: a live worker with room takes an orphan, bumping the epoch (the old owner, if
  it was only slow, is fenced off from then on) and continues it from its prompt plus the ids
  already published (workers/main.py).

Attempts: a request's `engine_deaths` counts the engines that died while it was inside them;
at `max_attempts` the next claimer parks it (dead-letter topic, error event) instead of running
it. A worker process that vanishes (SIGKILL, node loss) charges nobody, since that says nothing
about its requests; `takeovers` bounds those (3 x max_attempts) in case an input kills its
whole worker process.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from shared.messages import GenerationRequest
from shared.settings import Settings

# KEYS: req, ids, owned (the caller's). ARGV: rid, owner, epoch, request, feed, topic,
# partition, offset, ttl, traceparent, ids... Writes a request's record unless one exists: a
# first claim (epoch 1, no ids), or its owner writing it again after Redis lost it.
_CREATE = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner')
if h[1] then return {h[1], h[2] or ''} end
redis.call('HSET', KEYS[1], 'state', 'running', 'owner', ARGV[2], 'epoch', ARGV[3],
  'request', ARGV[4], 'feed', ARGV[5], 'topic', ARGV[6], 'partition', ARGV[7],
  'offset', ARGV[8], 'chars', 0, 'seconds', 0, 'engine_deaths', 0, 'takeovers', 0,
  'trace', ARGV[10])
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('DEL', KEYS[2])
for i = 11, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('SADD', KEYS[3], ARGV[1])
return {'new', ARGV[2]}
"""

# KEYS: req, events, ids, owned (the caller's), orphans
# ARGV: rid, epoch, channel, ttl, maxlen, chars, seconds, terminal, index of the first id,
# n_events, events..., ids... The ids list is extended only past what it holds, so a retried
# flush cannot record a token twice.
PUBLISH = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then return -1 end
if epoch ~= ARGV[2] or redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
local n = tonumber(ARGV[10])
for i = 1, n do
  redis.call('PUBLISH', ARGV[3], ARGV[10 + i])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[10 + i])
end
if n > 0 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
local skip = redis.call('LLEN', KEYS[3]) - tonumber(ARGV[9])
for i = 11 + n + math.max(skip, 0), #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
redis.call('EXPIRE', KEYS[3], ARGV[4])
redis.call('HSET', KEYS[1], 'chars', ARGV[6])
redis.call('HINCRBYFLOAT', KEYS[1], 'seconds', ARGV[7])
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'done')
  redis.call('SREM', KEYS[4], ARGV[1])
  redis.call('SREM', KEYS[5], ARGV[1])
end
return 1
"""

# KEYS: owned (the dead worker's), orphans, heartbeats. ARGV: worker id, the beat seen ('' if
# none). Nothing moves if the worker beat again meanwhile.
_ORPHAN_DEAD = """
if (redis.call('HGET', KEYS[3], ARGV[1]) or '') ~= ARGV[2] then return -1 end
local rids = redis.call('SMEMBERS', KEYS[1])
for _, rid in ipairs(rids) do redis.call('SADD', KEYS[2], rid) end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return #rids
"""

# KEYS: req, orphans, heartbeats. ARGV: rid, owned-key prefix. A running request whose owner
# has no heartbeat at all (it exited without handing over, e.g. Redis was down then).
_ADOPT = """
local h = redis.call('HMGET', KEYS[1], 'state', 'owner')
if h[1] ~= 'running' or redis.call('HEXISTS', KEYS[3], h[2]) == 1 then return 0 end
return redis.call('SMOVE', ARGV[2] .. h[2], KEYS[2], ARGV[1])
"""

# KEYS: orphans, req, owned (the claimer's), ids. ARGV: rid, claimer, the topics it reads
# (comma-separated): a request stays with workers of its own feed and model pool.
_CLAIM_ORPHAN = """
local topic = redis.call('HGET', KEYS[2], 'topic')
if not topic then redis.call('SREM', KEYS[1], ARGV[1]) return false end
if not string.find(',' .. ARGV[3] .. ',', ',' .. topic .. ',', 1, true) then return false end
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return false end
if redis.call('HGET', KEYS[2], 'state') ~= 'running' then return false end
local epoch = redis.call('HINCRBY', KEYS[2], 'epoch', 1)
redis.call('HSET', KEYS[2], 'owner', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'takeovers', 1)
redis.call('HSET', KEYS[2], 'resumed_after', redis.call('LLEN', KEYS[4]))
redis.call('SADD', KEYS[3], ARGV[1])
local h = redis.call('HMGET', KEYS[2], 'request', 'feed', 'topic', 'partition', 'offset',
  'chars', 'seconds', 'engine_deaths', 'takeovers', 'trace')
return {epoch, h, redis.call('LRANGE', KEYS[4], 0, -1)}
"""


@dataclass
class Claim:
    """A request this worker now owns, and where it stands."""

    request: GenerationRequest
    epoch: int
    feed: str  # "interactive" or "batch"
    topic: str
    partition: int
    offset: int
    emitted: list[int] = field(default_factory=list)  # token ids already published
    chars: int = 0  # characters of text already published
    seconds: float = 0.0  # engine seconds earlier owners reported
    engine_deaths: int = 0
    takeovers: int = 0
    traceparent: str = ""  # from its Kafka record's headers: a takeover's span joins the trace

    @property
    def suspect(self) -> bool:
        """It was inside an engine that died: run it apart from other suspects."""
        return self.engine_deaths > 0


class Owners:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._s = settings
        self.me = settings.worker_id
        self._ttl = int(settings.request_timeout_s) + 120  # a request's record outlives it
        self._create = redis.register_script(_CREATE)
        self.publish_script = redis.register_script(PUBLISH)
        self._orphan_dead = redis.register_script(_ORPHAN_DEAD)
        self._claim_orphan = redis.register_script(_CLAIM_ORPHAN)
        self._adopt = redis.register_script(_ADOPT)

    # -- keys -------------------------------------------------------------------------------

    def request_key(self, rid: str) -> str:
        return f"{self._s.redis_prefix}:req:{rid}"

    def ids_key(self, rid: str) -> str:
        return f"{self._s.redis_prefix}:ids:{rid}"

    def owned_key(self, worker_id: str) -> str:
        return f"{self._s.redis_prefix}:owned:{worker_id}"

    @property
    def orphans_key(self) -> str:
        return f"{self._s.redis_prefix}:orphans"

    # -- transitions ------------------------------------------------------------------------

    async def claim_new(self, claim: Claim) -> tuple[str, str]:
        """("new", me) if this worker now owns the request (at `claim.epoch`, 1); else the
        request's state ("running" or "done") and its owner: it is someone else's (or was)."""
        return await self._write(claim, [])

    async def reclaim(self, claim: Claim, ids: list[int]) -> None:
        """Write the record of a request this worker runs again, with the ids it generated,
        if Redis lost it (publish answered -1)."""
        await self._write(claim, ids)

    async def _write(self, c: Claim, ids: list[int]) -> tuple[str, str]:
        rid = c.request.request_id
        state, owner = await self._create(
            keys=[self.request_key(rid), self.ids_key(rid), self.owned_key(self.me)],
            args=[
                rid, self.me, c.epoch, c.request.model_dump_json(), c.feed, c.topic, c.partition,
                c.offset, self._ttl, c.traceparent, *ids,
            ],
        )  # fmt: skip
        return state.decode(), owner.decode()

    async def claim_orphan(self, rid: str, topics: list[str]) -> Claim | None:
        keys = [self.orphans_key, self.request_key(rid), self.owned_key(self.me), self.ids_key(rid)]
        got = await self._claim_orphan(keys=keys, args=[rid, self.me, ",".join(topics)])
        if not got:
            return None
        epoch, fields, ids = got
        raw, feed, topic, partition, offset, chars, seconds, deaths, takeovers, trace = fields
        return Claim(
            request=GenerationRequest.model_validate_json(raw),
            epoch=int(epoch),
            feed=feed.decode(),
            topic=topic.decode(),
            partition=int(partition),
            offset=int(offset),
            emitted=[int(i) for i in ids],
            chars=int(chars),
            seconds=float(seconds),
            engine_deaths=int(deaths),
            takeovers=int(takeovers),
            traceparent=(trace or b"").decode(),
        )

    async def state(self, rid: str) -> str | None:
        """ "running", "done", or None once the record expired."""
        raw = await self._redis.hget(self.request_key(rid), "state")
        return raw.decode() if raw is not None else None

    async def watch_state(self, rid: str) -> str | None:
        """The state of a request someone else owns; if that owner left without a word (no
        heartbeat at all), its request is made an orphan on the way."""
        keys = [self.request_key(rid), self.orphans_key, self._s.heartbeats_key]
        await self._adopt(keys=keys, args=[rid, self.owned_key("")])
        return await self.state(rid)

    async def orphans(self, n: int) -> list[str]:
        return [r.decode() for r in await self._redis.srandmember(self.orphans_key, n)]

    def publish_keys(self, rid: str) -> list[str]:
        """The keys the PUBLISH script touches for `rid`, in its order."""
        return [
            self.request_key(rid), self._s.events_key(rid), self.ids_key(rid),
            self.owned_key(self.me), self.orphans_key,
        ]  # fmt: skip

    async def finish_quietly(self, rid: str, epoch: int) -> bool:
        """Mark a request done without publishing anything (batch requests); False if fenced."""
        args = publish_args(rid, epoch, "", 60, 1, 0, 0.0, True, 0, [], [])
        return bool(await self.publish_script(keys=self.publish_keys(rid), args=args))

    async def restart_from_scratch(self, rid: str) -> None:
        """The claimer of a request that cannot continue from tokens regenerates it: the ids
        and text published so far no longer describe what it will publish (the API drops what
        its client already has, by token index and character offset)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self.ids_key(rid))
        pipe.hset(self.request_key(rid), "chars", 0)
        await pipe.execute()

    async def mine(self) -> list[str]:
        return [r.decode() for r in await self._redis.smembers(self.owned_key(self.me))]

    async def release(self, rids: list[str]) -> None:
        """Hand this worker's requests over to whoever claims them next (drain bound reached,
        engine died). The caller has published everything it generated first."""
        pipe = self._redis.pipeline(transaction=True)
        for rid in rids:
            pipe.smove(self.owned_key(self.me), self.orphans_key, rid)
        await pipe.execute()

    async def engine_died(self, rids: list[str]) -> None:
        """Charge the requests that were inside the engine when it died."""
        pipe = self._redis.pipeline(transaction=False)
        for rid in rids:
            pipe.hincrby(self.request_key(rid), "engine_deaths", 1)
        await pipe.execute()

    async def heartbeats(self) -> dict[bytes, bytes]:
        """Every worker's last beat, raw (worker id -> Heartbeat JSON): one HGETALL."""
        return await self._redis.hgetall(self._s.heartbeats_key)

    async def reap(self, beats: dict[bytes, bytes]) -> int:
        """Move the requests of every worker whose beat in `beats` is too old to the orphans;
        returns how many moved."""
        key = self._s.heartbeats_key
        moved = 0
        now = time.time()
        for worker_id, raw in beats.items():
            wid = worker_id.decode()
            if wid == self.me or now - _beat_ts(raw) < self._s.worker_dead_after_s:
                continue
            n = await self._orphan_dead(
                keys=[self.owned_key(wid), self.orphans_key, key], args=[wid, raw]
            )
            moved += max(0, int(n))
        return moved

    def parked_reason(self, claim: Claim) -> str | None:
        """Why a claimed request must not run again, or None."""
        limit = self._s.max_attempts
        if claim.engine_deaths >= limit:
            return f"poison pill: {claim.engine_deaths} engines died while running it"
        if claim.takeovers > 3 * limit:
            return f"poison pill: its worker was lost {claim.takeovers} times while running it"
        return None


def resumable(claim: Claim) -> bool:
    """Whether a taken-over request can continue from its published token ids. Batch requests
    publish nothing and re-run; with stop strings vLLM holds back text that may begin one, so
    published ids can run ahead of published text; a grammar (response_format) would restart
    at its root after them; penalties would not count them (they are prompt to the new
    engine): those regenerate from the start, and the API relays only what its client does
    not have yet."""
    s = claim.request.sampling
    return claim.feed != "batch" and not s.stop and s.structured() is None and not s.penalized()


def _beat_ts(raw: bytes) -> float:
    try:
        return float(json.loads(raw)["ts"])
    except (ValueError, KeyError, TypeError):
        return 0.0  # unreadable: treated as dead


def publish_args(
    rid: str,
    epoch: int,
    channel: str,
    ttl: int,
    maxlen: int,
    chars: int,
    seconds: float,
    terminal: bool,
    first_index: int,
    events: list[str],
    ids: list[int],
) -> list[Any]:
    return [
        rid, epoch, channel, ttl, maxlen, chars, repr(seconds), "1" if terminal else "0",
        first_index, len(events), *events, *ids,
    ]  # fmt: skip
