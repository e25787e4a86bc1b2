"""Every hop of a request, timestamped by the process where it happens.

Each process records the hops it sees of a request (`Tracer.hop`). A background task writes
them, every `FLUSH_S` in one pipelined round trip and never on the request's path, to the
request's Redis list `{prefix}:trace:{id}`, kept `SLUICE_TRACE_TTL_S`: `sluice trace ID` reads
it back as one timeline, so a slow request is explained from a terminal without a collector.

With `SLUICE_OTEL_ENDPOINT` (an OTLP/HTTP collector) the same hops also leave as OpenTelemetry
spans: per process one span for the request and one child span per gap between two of its hops,
named after the hop that ends it. The API puts the W3C `traceparent` of its span in the Kafka
message's headers (batch submitters may too) and the worker's span is its child, so a
collector shows the whole path as one trace; a client's own `traceparent` is the API span's
parent, and a worker that takes a request over joins its trace (workers/ownership.py keeps it).

Hop times are `time.time()` of the host that saw them: across hosts, clock skew shows up in the
gaps between processes (not within one).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from shared.settings import Settings

log = logging.getLogger(__name__)

FLUSH_S = 0.2
TRACEPARENT = "traceparent"
_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

# The request path's hops, in the order a request meets them; takeovers, fencing and
# dead-lettering add their own (`worker.took_over`, `worker.fenced`, ...).
API_ACCEPTED = "api.accepted"  # validated, admitted, its stream subscribed
KAFKA_PRODUCED = "kafka.produced"  # the broker acknowledged the message
WORKER_PICKED = "worker.picked"  # a worker took the record from Kafka
ENGINE_SUBMITTED = "engine.submitted"  # handed to the engine
# From the engine's own clock (vLLM's request stats), when it keeps one:
ENGINE_SCHEDULED = "engine.scheduled"  # its scheduler first ran the request
ENGINE_FIRST_TOKEN = "engine.first_token"  # it sampled the first token
WORKER_FIRST_TOKEN = "worker.first_token"  # the worker got that token from the engine
REDIS_FIRST_PUBLISH = "redis.first_publish"  # it was sent to Redis (pub/sub and stream)
API_FIRST_RELAY = "api.first_relay"  # the API got it from pub/sub
SSE_FIRST_WRITE = "sse.first_write"  # the API wrote it to the client's connection
WORKER_DONE = "worker.done"  # the done event was sent to Redis (and taken)
API_DONE = "api.done"  # the API relayed the terminal event

# What a streamed request meets up to its first token reaching the client, in this order.
FIRST_TOKEN_PATH = (
    API_ACCEPTED, KAFKA_PRODUCED, WORKER_PICKED, ENGINE_SUBMITTED, ENGINE_SCHEDULED,
    ENGINE_FIRST_TOKEN, WORKER_FIRST_TOKEN, REDIS_FIRST_PUBLISH, API_FIRST_RELAY, SSE_FIRST_WRITE,
)  # fmt: skip


def trace_key(settings: Settings, request_id: str) -> str:
    return f"{settings.redis_prefix}:trace:{request_id}"


def parse_traceparent(value: str | bytes | None) -> tuple[str, str] | None:
    """(trace id, parent span id) of a valid W3C traceparent; None otherwise."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    m = _TRACEPARENT_RE.match((value or "").strip().lower())
    if m is None or m.group(1) == "0" * 32 or m.group(2) == "0" * 16:
        return None
    return m.group(1), m.group(2)


def header(headers: Any, name: str = TRACEPARENT) -> bytes | None:
    """A Kafka record header's value (aiokafka gives a sequence of (key, bytes))."""
    for key, value in headers or ():
        if key == name:
            return value
    return None


@dataclass
class _Request:
    """One process's view of one request."""

    traceparent: str
    hops: list[tuple[str, float, dict[str, Any]]] = field(default_factory=list)
    span: Any = None  # the OpenTelemetry span of this process, when exporting


class Tracer:
    """One per process. Without Redis (`redis=None`) and without an endpoint it keeps only
    each open request's traceparent."""

    def __init__(self, settings: Settings, redis: Redis | None, service: str) -> None:
        self._settings = settings
        self._redis = redis if settings.trace_ttl_s > 0 else None
        self._by = settings.worker_id if service == "sluice-worker" else service
        self._open: dict[str, _Request] = {}
        self._unsent: list[tuple[str, str]] = []  # (request id, hop as JSON)
        self._otel = _otel_tracer(settings, service) if settings.otel_endpoint else None

    def start(self, request_id: str, parent: str | bytes | None = None, name: str = "") -> str:
        """Begin this process's part of a request; returns the traceparent to pass on."""
        if request_id in self._open:
            return self._open[request_id].traceparent
        ids = parse_traceparent(parent)
        span = None
        if self._otel is not None:
            server = self._by == "sluice-api"
            span = _start_span(self._otel, name or self._by, ids, server)
            ctx = span.get_span_context()
            traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01"
        else:
            trace_id = ids[0] if ids else os.urandom(16).hex()
            traceparent = f"00-{trace_id}-{os.urandom(8).hex()}-01"
        self._open[request_id] = _Request(traceparent, span=span)
        return traceparent

    def hop(self, request_id: str, name: str, t: float | None = None, **attrs: Any) -> None:
        t = time.time() if t is None else t
        entry = {"hop": name, "t": round(t, 6), "by": self._by, **attrs}
        request = self._open.get(request_id)
        if request is not None:
            if request.span is not None:  # kept only to become spans at end()
                request.hops.append((name, t, attrs))
            entry.setdefault("trace", request.traceparent.split("-")[1])
        if self._redis is not None:
            self._unsent.append((request_id, json.dumps(entry, separators=(",", ":"))))

    def end(self, request_id: str) -> None:
        """This process is done with the request: its spans leave (when exporting)."""
        request = self._open.pop(request_id, None)
        if request is None or request.span is None:
            return
        _child_spans(self._otel, request)

    async def run(self) -> None:
        """Until cancelled: write recorded hops to Redis."""
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                await self.flush()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())

    async def flush(self) -> None:
        if not self._unsent or self._redis is None:
            return
        batch, self._unsent = self._unsent, []
        pipe = self._redis.pipeline(transaction=False)
        ttl = self._settings.trace_ttl_s
        for request_id in dict.fromkeys(rid for rid, _ in batch):
            key = trace_key(self._settings, request_id)
            pipe.rpush(key, *[hop for rid, hop in batch if rid == request_id])
            pipe.expire(key, ttl)
        try:
            await pipe.execute()
        except Exception as e:  # a trace is worth less than the request: drop it, say so
            log.warning("dropped %d trace hops: %s", len(batch), e)

    def shutdown(self) -> None:
        if self._otel is not None:
            from opentelemetry import trace

            provider = trace.get_tracer_provider()
            with contextlib.suppress(Exception):
                provider.shutdown()  # type: ignore[attr-defined]


async def timeline(redis: Redis, settings: Settings, request_id: str) -> list[dict[str, Any]]:
    """Every hop recorded for the request, by every process, in time order."""
    raw = await redis.lrange(trace_key(settings, request_id), 0, -1)
    hops = [json.loads(h) for h in raw]
    return sorted(hops, key=lambda h: h["t"])


def render(request_id: str, hops: list[dict[str, Any]]) -> str:
    """The timeline for a terminal: time since the first hop, the gap since the previous one
    (the longest marked: where the request waited), who saw it, and what it carried."""
    if not hops:
        return f"no trace for {request_id} (unknown, expired, or SLUICE_TRACE_TTL_S=0)"
    t0 = hops[0]["t"]
    gaps = [0.0] + [b["t"] - a["t"] for a, b in itertools.pairwise(hops)]
    longest = max(range(len(gaps)), key=gaps.__getitem__)
    traces = sorted({h["trace"] for h in hops if "trace" in h})
    lines = [f"request {request_id}  trace {', '.join(traces) or '-'}"]
    lines.append(f"{'at ms':>10} {'gap ms':>9}  {'by':<24} {'hop':<22} details")
    for i, h in enumerate(hops):
        extra = " ".join(f"{k}={v}" for k, v in h.items() if k not in ("hop", "t", "by", "trace"))
        mark = "  <- longest gap" if i == longest and len(hops) > 1 else ""
        lines.append(
            f"{(h['t'] - t0) * 1000:>10.1f} {gaps[i] * 1000:>9.1f}  {h['by'][:24]:<24} "
            f"{h['hop']:<22} {extra}{mark}"
        )
    return "\n".join(lines)


# -- OpenTelemetry ---------------------------------------------------------------------------


def _otel_tracer(settings: Settings, service: str) -> Any:
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    endpoint = str(settings.otel_endpoint).rstrip("/") + "/v1/traces"
    resource = Resource.create({"service.name": service, "service.instance.id": settings.worker_id})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    return trace.get_tracer("sluice")


def _start_span(tracer: Any, name: str, parent: tuple[str, str] | None, server: bool) -> Any:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

    context = None
    if parent is not None:
        remote = SpanContext(
            int(parent[0], 16), int(parent[1], 16), is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )  # fmt: skip
        context = trace.set_span_in_context(NonRecordingSpan(remote))
    kind = SpanKind.SERVER if server else SpanKind.CONSUMER
    return tracer.start_span(name, context=context, kind=kind)


def _child_spans(tracer: Any, request: _Request) -> None:
    from opentelemetry import trace

    context = trace.set_span_in_context(request.span)
    for (_, start, _), (name, end, attrs) in itertools.pairwise(request.hops):
        span = tracer.start_span(name, context=context, start_time=int(start * 1e9))
        span.set_attributes({k: v for k, v in attrs.items() if isinstance(v, str | int | float)})
        span.end(end_time=int(max(end, start) * 1e9))
    if request.hops:
        request.span.end(end_time=int(request.hops[-1][1] * 1e9))
    else:
        request.span.end()
