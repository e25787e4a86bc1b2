"""The Prometheus rules and Grafana dashboards in monitoring/ name only metrics that Sluice (or
the vLLM engine it runs) really exports, and every dashboard query parses. promtool checks the
rules' syntax and alert behaviour (`make monitoring-check`)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import shared.metrics  # noqa: F401  (registers the sluice_* metrics)
from tests.test_gpu_metrics import TwoGpus
from workers.gpu import GpuCollector

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
RULES = MONITORING / "rules"
DASHBOARDS = MONITORING / "grafana" / "dashboards"
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "")
METRIC = re.compile(r"\b(?:sluice_[a-z0-9_]+|vllm:[a-z0-9_]+|process_[a-z_]+)")


def vllm_metrics() -> set[str]:
    """The metric names vLLM's engine defines (it registers them in the worker process)."""
    spec = importlib.util.find_spec("vllm.v1.metrics.loggers")
    assert spec is not None and spec.origin is not None
    return set(re.findall(r'name="(vllm:[a-z_]+)"', Path(spec.origin).read_text()))


def exported() -> set[str]:
    names = {n + suffix for n in vllm_metrics() for suffix in SUFFIXES}
    families = [*REGISTRY.collect(), *GpuCollector(TwoGpus()).collect()]
    for family in families:
        names.update(family.name + suffix for suffix in SUFFIXES)
    return names


def referenced() -> set[str]:
    recorded, used = set(), set()
    for path in RULES.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    recorded.add(rule["record"])
                used.update(METRIC.findall(rule["expr"]))
    return used - recorded


def dashboard_queries() -> list[str]:
    return [
        target["expr"]
        for path in sorted(DASHBOARDS.glob("*.json"))
        for panel in json.loads(path.read_text())["panels"]
        for target in panel["targets"]
    ]


def test_rules_use_only_exported_metrics() -> None:
    names = referenced()
    assert "sluice_kafka_consumer_lag" in names  # the parser found the metrics at all
    assert names <= exported(), names - exported()


def test_dashboards_use_only_exported_or_recorded_metrics() -> None:
    recorded = {
        rule["record"]
        for path in RULES.glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    queries = dashboard_queries()
    assert len(queries) > 20
    used = {name for q in queries for name in METRIC.findall(q)}
    assert used <= exported(), used - exported()
    for q in queries:  # recording rules used by panels exist
        for name in re.findall(r"\bsluice:[a-z0-9_:]+", q):
            assert name in recorded, name


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each panel's PromQL, checked by promtool as a recording rule's expression."""
    if shutil.which("promtool") is None:
        pytest.skip("no promtool (make monitoring-check installs Debian's prometheus)")
    rules = [{"record": f"panel:query_{i}", "expr": q} for i, q in enumerate(dashboard_queries())]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
