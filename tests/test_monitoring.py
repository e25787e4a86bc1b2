"""The Prometheus rules in monitoring/ name only metrics that Sluice (or the vLLM engine it
runs) really exports. promtool checks their syntax and alert behaviour (`make monitoring-check`)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import shared.metrics  # noqa: F401  (registers the sluice_* metrics)
from tests.test_gpu_metrics import TwoGpus
from workers.gpu import GpuCollector

RULES = Path(__file__).resolve().parent.parent / "monitoring" / "rules"
# Engine metrics come from vLLM in the worker process; these are the ones the rules use.
VLLM = {"vllm:generation_tokens_total"}
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "")


def exported() -> set[str]:
    names = set(VLLM)
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
                used.update(re.findall(r"\b(?:sluice_[a-z0-9_]+|vllm:[a-z0-9_]+)", rule["expr"]))
    return used - recorded


def test_rules_use_only_exported_metrics() -> None:
    names = referenced()
    assert "sluice_kafka_consumer_lag" in names  # the parser found the metrics at all
    assert names <= exported(), names - exported()
