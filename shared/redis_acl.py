"""Redis ACL users: one per service, each allowed only its commands, keys and channels.

Without them, anything that reaches Redis may write an API key record with `"admin": true`,
read every tenant's outputs, inject token events or cancel anyone's request. With them, the
default user is off and each service authenticates as its own user (SLUICE_REDIS_USERNAME,
SLUICE_REDIS_PASSWORD):

- `sluice-api` reads API keys, heartbeats, event streams and document statuses; it writes only
  what belongs to requests it takes in (owner, rate limit, cancel, resume, trace), the
  ledger (its embedding requests) and the Batch API's files and batches;
- `sluice-worker` owns the request records and publishes tokens; it reads cancels and the
  batch signing secrets, and cannot see API keys or documents;
- `sluice-ingestion` writes document statuses only;
- `sluice-cli` is the operator's: everything under the prefix, but no dangerous commands.

No user may run KEYS, SCAN, FLUSHALL, CONFIG, DEBUG or the like (`-@dangerous`). Passwords go in
as SHA-256 hashes, so the ACL file can live in a Secret without the passwords themselves.
Scripts (EVALSHA) are checked too: every command a script runs needs the caller's permission.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# (Redis 7.2 adds CLIENT SETINFO, which redis-py sends on connect and does without if refused.)
_CONNECTION = "+ping +hello +auth +client|setname +select"
_SCRIPTS = "+evalsha +script|load +script|exists +multi +exec +discard"


@dataclass(frozen=True)
class Rules:
    commands: str
    read: tuple[str, ...] = ()  # key patterns under the prefix, read only
    write: tuple[str, ...] = ()  # ... read and written
    channels: tuple[str, ...] = ()


SERVICES: dict[str, Rules] = {
    "api": Rules(
        commands="+get +set +mget +exists +expire +pexpire +incr +del +hgetall +hincrbyfloat "
        "+hset +hsetnx +hincrby +hget +hmget +hlen +hexists +zadd +zrange +zrevrange "
        "+zrangebyscore +zrem +zscore +zremrangebyscore +time +rpush +xrange +publish "
        "+subscribe +unsubscribe",
        read=("apikey:*", "apikey-id:*", "workers", "events:*"),
        write=(
            "owner:*",
            "ratelimit:*",
            "resumed:*",
            "cancelled:*",
            "trace:*",
            "doc:*",
            "ledger:*",
            # the Batch API's (api/files.py, api/batches.py)
            "file:*",
            "files:*",
            "batch:*",
            "batches:*",
            "batches-open",
        ),
        channels=("stream:*", "api:*", "cancel"),
    ),
    "worker": Rules(
        commands="+get +exists +del +expire +hget +hset +hmget +hdel +hexists +hgetall +hincrby "
        "+hincrbyfloat +rpush +llen +lrange +sadd +srem +smembers +smove +srandmember +xadd "
        "+publish +subscribe +unsubscribe",
        read=("cancelled:*", "batch-signer:*"),
        write=(
            "req:*",
            "ids:*",
            "owned:*",
            "orphans",
            "events:*",
            "workers",
            "trace:*",
            "ledger:*",
        ),
        channels=("stream:*", "cancel"),
    ),
    "ingestion": Rules(commands="+get +set", write=("doc:*",)),
    "cli": Rules(
        commands="+@read +@write +@pubsub +@transaction -@dangerous -scan",
        write=("*",),
        channels=("*",),
    ),
}


def username(service: str) -> str:
    return f"sluice-{service}"


def user_rule(prefix: str, service: str, password: str) -> str:
    """One `user` line of an ACL file."""
    rules = SERVICES[service]
    digest = hashlib.sha256(password.encode()).hexdigest()
    parts = [f"user {username(service)} on #{digest} resetkeys resetchannels -@all"]
    parts += [_CONNECTION, _SCRIPTS, rules.commands]
    parts += [f"%R~{prefix}:{p}" for p in rules.read]
    parts += [f"~{prefix}:{p}" for p in rules.write]
    parts += [f"&{prefix}:{c}" for c in rules.channels]
    return " ".join(parts)


def acl_file(prefix: str, passwords: dict[str, str]) -> str:
    """An ACL file (redis-server --aclfile) with the default user off and a user per service
    in `passwords` (service -> password)."""
    lines = ["user default off resetkeys resetchannels -@all"]
    lines += [user_rule(prefix, s, p) for s, p in passwords.items()]
    return "\n".join(lines) + "\n"
