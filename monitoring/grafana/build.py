"""Write Sluice's Grafana dashboards (monitoring/grafana/dashboards/*.json) from the panel list
below: one place to read every query, and JSON that stays uniform.

    python monitoring/grafana/build.py
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
Q = "histogram_quantile({q}, sum by (le) (rate({m}_bucket[5m])))"

# dashboard -> [(panel title, unit, [(legend, PromQL)])]
DASHBOARDS: dict[str, list[tuple[str, str, list[tuple[str, str]]]]] = {
    "Serving": [
        ("Time to first token (client)", "s", [
            ("p50", "sluice:time_to_first_token_seconds:p50"),
            ("p95", "sluice:time_to_first_token_seconds:p95"),
            ("p99", "sluice:time_to_first_token_seconds:p99")]),
        ("End-to-end latency (client)", "s", [
            ("p50", "sluice:e2e_request_latency_seconds:p50"),
            ("p99", "sluice:e2e_request_latency_seconds:p99")]),
        ("Inter-token latency (engine)", "s", [
            ("p50", Q.format(q=0.5, m="vllm:inter_token_latency_seconds")),
            ("p99", Q.format(q=0.99, m="vllm:inter_token_latency_seconds"))]),
        ("Inter-token latency (client)", "s", [
            ("p50", Q.format(q=0.5, m="sluice_inter_token_latency_seconds")),
            ("p99", Q.format(q=0.99, m="sluice_inter_token_latency_seconds"))]),
        ("Redis -> SSE delivery latency", "s", [
            ("p50", Q.format(q=0.5, m="sluice_stream_delivery_latency_seconds")),
            ("p99", Q.format(q=0.99, m="sluice_stream_delivery_latency_seconds"))]),
        ("Open SSE streams", "short", [("", "sum(sluice_open_streams)")]),
        ("Output tokens/s", "short", [("all workers", "sluice:generation_tokens:rate1m")]),
        ("Requests in engines", "short", [
            ("running", "sum(vllm:num_requests_running)"),
            ("waiting", "sum(vllm:num_requests_waiting)")]),
        ("KV cache usage", "percentunit", [("{{instance}}", "vllm:kv_cache_usage_perc")]),
        ("HTTP requests/s by status", "reqps", [
            ("{{endpoint}} {{status}}", "sum by (endpoint, status) (rate(sluice_requests_total[1m]))")]),
    ],
    "Queue": [
        ("Consumer lag by topic", "short", [("{{topic}} ({{group}})", "sluice:kafka_consumer_lag:sum")]),
        ("Consumer lag by partition", "short", [
            ("{{topic}}/{{partition}}", "sum by (topic, partition) (sluice_kafka_consumer_lag)")]),
        ("Time in Kafka (API produce -> worker pick-up)", "s", [
            ("p50", Q.format(q=0.5, m="sluice_kafka_queue_time_seconds")),
            ("p99", Q.format(q=0.99, m="sluice_kafka_queue_time_seconds"))]),
        ("Requests picked up/s", "reqps", [("", "sum(rate(sluice_kafka_queue_time_seconds_count[1m]))")]),
        ("Dead-lettered messages (10 min)", "short", [
            ("{{topic}}", "sum by (topic) (increase(sluice_dead_lettered_total[10m]))")]),
        ("Live workers / in flight", "short", [
            ("live workers", "max(sluice_live_workers)"),
            ("in flight", "sum(sluice_worker_in_flight)")]),
    ],
    "Hardware": [
        ("Engine utilization", "percentunit", [
            ("{{instance}}", "rate(sluice_engine_busy_seconds_total[5m])")]),
        ("Mean requests in engine while busy", "short", [
            ("{{instance}}", "rate(sluice_engine_request_seconds_total[5m]) / rate(sluice_engine_busy_seconds_total[5m])")]),
        ("GPU utilization (NVML)", "percentunit", [("gpu {{gpu}}", "sluice_gpu_utilization_ratio")]),
        ("GPU memory", "bytes", [
            ("used {{gpu}}", "sluice_gpu_memory_used_bytes"),
            ("total {{gpu}}", "sluice_gpu_memory_total_bytes")]),
        ("Process CPU", "percentunit", [("{{job}} {{instance}}", "rate(process_cpu_seconds_total[1m])")]),
        ("Process memory", "bytes", [("{{job}} {{instance}}", "process_resident_memory_bytes")]),
    ],
    "Cost": [
        ("Spend rate ($/h) by model", "currencyUSD", [
            ("{{model_name}}", "sum by (model_name) (rate(sluice_cost_dollars_total[5m])) * 3600")]),
        ("Cost per 1,000 requests", "currencyUSD", [
            ("", "1000 * sum(rate(sluice_cost_dollars_total[1h])) / sum(rate(sluice_request_cost_dollars_count[1h]))")]),
        ("Cost per request", "currencyUSD", [
            ("p50", Q.format(q=0.5, m="sluice_request_cost_dollars")),
            ("p99", Q.format(q=0.99, m="sluice_request_cost_dollars"))]),
        ("Engine time billed to requests", "percentunit", [
            ("", "sum(rate(sluice_engine_attributed_seconds_total[1h])) / sum(rate(sluice_engine_busy_seconds_total[1h]))")]),
    ],
    "RAG": [
        ("Documents ingested/min by outcome", "short", [
            ("{{outcome}}", "sum by (outcome) (rate(sluice_ingested_documents_total[5m])) * 60")]),
        ("Chunks embedded/s", "short", [("", "sum(rate(sluice_ingested_chunks_total[5m]))")]),
        ("Retrieval latency", "s", [
            ("p50 {{mode}}", "histogram_quantile(0.5, sum by (le, mode) (rate(sluice_retrieval_latency_seconds_bucket[5m])))"),
            ("p99 {{mode}}", "histogram_quantile(0.99, sum by (le, mode) (rate(sluice_retrieval_latency_seconds_bucket[5m])))")]),
        ("Ingestion backlog", "short", [
            ("{{topic}}", 'sluice:kafka_consumer_lag:sum{group="sluice-ingestion"}')]),
    ],
}  # fmt: skip


def panel(i: int, title: str, unit: str, targets: list[tuple[str, str]]) -> dict:
    return {
        "id": i + 1,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(65 + j), "expr": expr, "legendFormat": legend}
            for j, (legend, expr) in enumerate(targets)
        ],
    }


def dashboard(name: str, panels: list[tuple[str, str, list[tuple[str, str]]]]) -> dict:
    return {
        "uid": f"sluice-{name.lower()}",
        "title": f"Sluice / {name}",
        "tags": ["sluice"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "panels": [panel(i, *p) for i, p in enumerate(panels)],
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, panels in DASHBOARDS.items():
        path = OUT / f"{name.lower()}.json"
        path.write_text(json.dumps(dashboard(name, panels), indent=2) + "\n")
        print(path)


if __name__ == "__main__":
    main()
