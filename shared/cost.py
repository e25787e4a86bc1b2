"""The cost report: what a window of traffic cost, what a month will cost, and what to change.

Read from the ledger (shared/ledger.py), priced with the settings. Two views of the same money:
- fleet: what the workers' instances cost while they ran, idle time included. This is the bill,
  so per-request and per-token figures use it.
- attributed: the engine time requests actually used (token share of each engine interval,
  workers/cost.py). fleet - attributed is what idling cost.
The formulas and assumptions are in docs/COST.md.
"""

from __future__ import annotations

import math
import re
import time

from pydantic import BaseModel

from shared import ledger
from shared.settings import Settings

HOURS_PER_MONTH = 730
# Utilization a right-sized fleet runs at: headroom for bursts while KEDA adds workers.
TARGET_UTILIZATION = 0.7
LOW_UTILIZATION = 0.5  # below this, right-sizing is worth the trouble
# Spot/preemptible GPU price vs on-demand: AWS, GCP and Azure list 60-90% off; we assume the
# low end.
ASSUMED_SPOT_DISCOUNT = 0.6


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 7 * 86400


def parse_window(text: str) -> float:
    """`90s`, `15m`, `1h`, `7d` (or plain seconds) -> seconds; ValueError says what is wrong."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError("must be a duration such as 15m, 1h or 7d")
    seconds = float(match[1]) * _UNITS[match[2] or "s"]
    if not 60 <= seconds <= MAX_WINDOW_S:
        raise ValueError("must be between 1m and 7d (the ledger keeps a week)")
    return seconds


async def report(reader: ledger.Reader, settings: Settings, window_s: float) -> CostReport:
    end, totals = await reader.window(window_s)
    return build_report(totals, settings, window_s, end)


class Recommendation(BaseModel):
    id: str
    action: str
    reason: str
    monthly_saving_usd: float


class MonthlyProjection(BaseModel):
    workers: float  # mean number of workers alive in the window
    instances_usd: float
    fixed_usd: float  # vector DB + storage
    total_usd: float
    requests_at_current_rate: float
    # What the same fleet could serve if its engines were never idle (at the window's batch
    # sizes: a lower bound, since fuller engines batch more).
    requests_at_full_utilization: float
    per_1k_requests_at_full_utilization_usd: float | None


class WindowTotals(BaseModel):
    """A window of the ledger and the requests and tokens in it."""

    window_s: float
    start: float
    end: float
    requests: int
    prompt_tokens: int
    completion_tokens: int


class CostReport(WindowTotals):
    worker_hours: float
    engine_busy_hours: float
    utilization: float | None
    mean_batch_size: float | None
    mean_kv_cache_usage: float | None
    preemptions: int
    fleet_usd: float
    attributed_usd: float
    idle_usd: float
    per_request_usd: float | None
    per_1k_requests_usd: float | None
    per_1m_tokens_usd: float | None
    attributed_per_1k_requests_usd: float | None
    by_tenant_usd: dict[str, float]
    by_topic_usd: dict[str, float]
    by_model_usd: dict[str, float]  # by the catalog's model whose pool served it
    monthly: MonthlyProjection
    recommendations: list[Recommendation]


class ModelUsage(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class TenantUsage(WindowTotals):
    """One tenant's own requests and the engine time they used (`GET /usage`), without the
    fleet's figures: those include other tenants' traffic."""

    tenant: str
    cost_usd: float  # attributed: its token share of engine time
    per_1k_requests_usd: float | None
    # By the model that served them: a catalog model's pool, or the embedding model
    by_model: dict[str, ModelUsage] = {}


async def tenant_usage(
    reader: ledger.Reader, settings: Settings, tenant: str, window_s: float
) -> TenantUsage:
    end, totals = await reader.window(window_s)
    requests = int(totals.get(f"requests@tenant:{tenant}", 0))
    dollars = totals.get(f"dollars@tenant:{tenant}", 0.0)
    return TenantUsage(
        tenant=tenant,
        window_s=window_s,
        start=end - window_s,
        end=end,
        requests=requests,
        prompt_tokens=int(totals.get(f"prompt_tokens@tenant:{tenant}", 0)),
        completion_tokens=int(totals.get(f"completion_tokens@tenant:{tenant}", 0)),
        cost_usd=round(dollars, 8),
        per_1k_requests_usd=_ratio(dollars * 1000, requests),
        by_model=_by_model(totals, tenant),
    )


def _by_model(totals: dict[str, float], tenant: str) -> dict[str, ModelUsage]:
    fields: dict[str, dict[str, float]] = {}
    for key, amount in totals.items():
        field, sep, rest = key.partition(f"@tenant-model:{tenant}:")
        if sep and field:
            fields.setdefault(rest, {})[field] = amount
    return {
        model: ModelUsage(
            requests=int(f.get("requests", 0)),
            prompt_tokens=int(f.get("prompt_tokens", 0)),
            completion_tokens=int(f.get("completion_tokens", 0)),
            cost_usd=round(f.get("dollars", 0.0), 8),
        )
        for model, f in sorted(fields.items())
    }


def worker_hourly_usd(settings: Settings) -> float:
    """One worker drives one GPU: its share of the instance price, after any spot discount."""
    return settings.instance_hourly_usd * (1 - settings.spot_discount) / settings.gpus_per_instance


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _labelled(totals: dict[str, float], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): round(v, 8) for k, v in totals.items() if k.startswith(prefix)}


def build_report(
    totals: dict[str, float], settings: Settings, window_s: float, end: float | None = None
) -> CostReport:
    end = time.time() if end is None else end
    get = totals.get
    requests = int(get("requests", 0))
    tokens = get("prompt_tokens", 0) + get("completion_tokens", 0)
    worker_s, busy_s = get("worker_seconds", 0.0), get("busy_seconds", 0.0)
    fleet = worker_s / 3600 * worker_hourly_usd(settings)
    attributed = get("dollars", 0.0)
    per_request = _ratio(fleet, requests)
    report = CostReport(
        window_s=window_s,
        start=end - window_s,
        end=end,
        requests=requests,
        prompt_tokens=int(get("prompt_tokens", 0)),
        completion_tokens=int(get("completion_tokens", 0)),
        worker_hours=worker_s / 3600,
        engine_busy_hours=busy_s / 3600,
        utilization=_ratio(busy_s, worker_s),
        mean_batch_size=_ratio(get("request_seconds", 0.0), busy_s),
        mean_kv_cache_usage=_ratio(get("kv_usage_seconds", 0.0), busy_s),
        preemptions=int(get("preemptions", 0)),
        fleet_usd=fleet,
        attributed_usd=attributed,
        idle_usd=max(0.0, fleet - attributed),
        per_request_usd=per_request,
        per_1k_requests_usd=per_request * 1000 if per_request is not None else None,
        per_1m_tokens_usd=_scaled(_ratio(fleet, tokens), 1e6),
        attributed_per_1k_requests_usd=_scaled(_ratio(attributed, requests), 1000),
        by_tenant_usd=_labelled(totals, "dollars@tenant:"),
        by_topic_usd=_labelled(totals, "dollars@topic:"),
        by_model_usd=_labelled(totals, "dollars@model:"),
        monthly=_monthly(totals, settings, window_s),
        recommendations=[],
    )
    report.recommendations = recommend(report, settings)
    return report


def _scaled(value: float | None, factor: float) -> float | None:
    return value * factor if value is not None else None


def _monthly(totals: dict[str, float], settings: Settings, window_s: float) -> MonthlyProjection:
    per_month = HOURS_PER_MONTH * 3600 / window_s
    workers = totals.get("worker_seconds", 0.0) / window_s
    instances = workers * worker_hourly_usd(settings) * HOURS_PER_MONTH
    fixed = settings.vector_db_monthly_usd + settings.storage_monthly_usd
    requests = totals.get("requests", 0.0) * per_month
    utilization = _ratio(totals.get("busy_seconds", 0.0), totals.get("worker_seconds", 0.0))
    at_full = requests / utilization if utilization else 0.0
    return MonthlyProjection(
        workers=workers,
        instances_usd=instances,
        fixed_usd=fixed,
        total_usd=instances + fixed,
        requests_at_current_rate=requests,
        requests_at_full_utilization=at_full,
        per_1k_requests_at_full_utilization_usd=_scaled(_ratio(instances, at_full), 1000),
    )


def recommend(report: CostReport, settings: Settings) -> list[Recommendation]:
    """What to change, each with the saving it would bring at this window's traffic."""
    found = [_right_size(report), _quantize(report, settings), _spot_batch(report, settings)]
    return sorted((r for r in found if r), key=lambda r: -r.monthly_saving_usd)


def _right_size(report: CostReport) -> Recommendation | None:
    """Idle engines: fewer workers, or none while the queue is empty, at the target
    utilization."""
    util, fleet = report.utilization, report.monthly.instances_usd
    if util is None or util >= LOW_UTILIZATION or fleet <= 0:
        return None
    workers = report.monthly.workers
    needed = math.ceil(util * workers / TARGET_UTILIZATION)
    if needed >= 1 and workers - needed >= 1:
        action = f"run {needed} worker(s) instead of {workers:.1f} on average"
        saving = fleet * (workers - needed) / workers
    else:
        # Scaled to zero, the fleet runs only while there is work, at the target utilization.
        action = (
            "scale workers to zero when the queue is empty (KEDA minReplicaCount: 0, "
            "docs/DEPLOYMENT.md) or move to a smaller, cheaper GPU"
        )
        saving = fleet * (1 - util / TARGET_UTILIZATION)
    return Recommendation(
        id="right_size",
        action=action,
        reason=f"engines were busy {util:.0%} of the time (target {TARGET_UTILIZATION:.0%})",
        monthly_saving_usd=saving,
    )


def _quantize(report: CostReport, settings: Settings) -> Recommendation | None:
    """Memory-bound: the KV cache is full enough that vLLM preempts (and recomputes) requests.
    INT8 weights free memory for KV cache. The saving counted is only the recomputation: each
    preemption wastes about half a request's engine time (a lower bound)."""
    kv = report.mean_kv_cache_usage or 0.0
    if settings.quantization != "none" or (report.preemptions == 0 and kv < 0.9):
        return None
    if not report.requests:
        return None
    per_request = report.monthly.instances_usd / report.monthly.requests_at_current_rate
    wasted_share = min(1.0, report.preemptions * 0.5 / report.requests)
    return Recommendation(
        id="int8",
        action="SLUICE_QUANTIZATION=int8: weights -70% leave room for KV cache "
        "(docs/BENCHMARKS.md §4), or raise SLUICE_KV_CACHE_SPACE_GIB / "
        "SLUICE_GPU_MEMORY_UTILIZATION",
        reason=f"{report.preemptions} preemptions, mean KV cache usage {kv:.0%} while busy",
        monthly_saving_usd=per_request * report.monthly.requests_at_current_rate * wasted_share,
    )


def _spot_batch(report: CostReport, settings: Settings) -> Recommendation | None:
    """Batch traffic tolerates a worker vanishing (its request is redelivered), so it can run
    on spot capacity."""
    spent = sum(report.by_topic_usd.values())
    # Each model pool's batch topic is the default one's name with the model's slug appended.
    batch = sum(
        v for t, v in report.by_topic_usd.items() if t.startswith(settings.batch_requests_topic)
    )
    if settings.spot_discount > 0 or batch <= 0 or spent <= 0:
        return None
    share = batch / spent
    return Recommendation(
        id="spot_for_batch",
        action="run the batch worker pool on spot/preemptible GPU nodes "
        f"(assumed {ASSUMED_SPOT_DISCOUNT:.0%} off; set SLUICE_SPOT_DISCOUNT on those workers)",
        reason=f"{share:.0%} of engine cost served batch topics",
        monthly_saving_usd=report.monthly.instances_usd * share * ASSUMED_SPOT_DISCOUNT,
    )


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.4g} h" if seconds >= 3600 else f"{seconds / 60:.3g} min"


def _usd(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"${value:,.{digits}f}"


def render(r: CostReport) -> str:
    """The report as a terminal reads it."""
    pct = "n/a" if r.utilization is None else f"{r.utilization:.1%}"
    batch = "n/a" if r.mean_batch_size is None else f"{r.mean_batch_size:.1f}"
    m = r.monthly
    lines = [
        f"Window: last {_duration(r.window_s)}",
        f"  requests {r.requests:,}, tokens {r.prompt_tokens:,} in / {r.completion_tokens:,} out",
        f"  worker hours {r.worker_hours:.3f}, engine busy {pct}, mean batch {batch}, "
        f"preemptions {r.preemptions}",
        f"  spent {_usd(r.fleet_usd, 4)} (requests used {_usd(r.attributed_usd, 4)}, "
        f"idle {_usd(r.idle_usd, 4)})",
        f"  per request {_usd(r.per_request_usd, 6)}, per 1k requests "
        f"{_usd(r.per_1k_requests_usd, 4)}, per 1M tokens {_usd(r.per_1m_tokens_usd)}",
        "Monthly projection",
        f"  at the current rate: {m.workers:.2f} workers {_usd(m.instances_usd)} + fixed "
        f"{_usd(m.fixed_usd)} = {_usd(m.total_usd)} for {m.requests_at_current_rate:,.0f} "
        "requests",
        f"  at full utilization: {m.requests_at_full_utilization:,.0f} requests, "
        f"{_usd(m.per_1k_requests_at_full_utilization_usd, 4)} per 1k",
        "Recommendations",
    ]
    for rec in r.recommendations:
        saving = _usd(rec.monthly_saving_usd)
        lines.append(f"  - {rec.action}: saves ~{saving}/month ({rec.reason})")
    if not r.recommendations:
        lines.append("  none: utilization, memory and pricing look right for this traffic")
    return "\n".join(lines)
