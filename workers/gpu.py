"""The GPU's own view of saturation, from NVML, exported on the worker's /metrics.

Read at scrape time by a Prometheus collector (no sampling thread). Registered only when NVML
starts, i.e. on a host with an NVIDIA driver; elsewhere the series are absent, not zero.
Names follow Prometheus conventions (`_ratio` in 0..1, `_bytes`), labelled by GPU index and UUID
so that they join with the DCGM exporter's series on a Kubernetes node.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

log = logging.getLogger(__name__)


class GpuCollector(Collector):
    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        count = nvml.nvmlDeviceGetCount()
        self._gpus = []
        for i in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            self._gpus.append((str(i), _text(nvml.nvmlDeviceGetUUID(handle)), handle))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["gpu", "uuid"]
        util = GaugeMetricFamily(
            "sluice_gpu_utilization_ratio",
            "Share of the last sample period in which a kernel ran on the GPU (NVML)",
            labels=labels,
        )
        used = GaugeMetricFamily("sluice_gpu_memory_used_bytes", "GPU memory in use", labels=labels)
        total = GaugeMetricFamily("sluice_gpu_memory_total_bytes", "GPU memory", labels=labels)
        for index, uuid, handle in self._gpus:
            rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            util.add_metric([index, uuid], rates.gpu / 100)
            used.add_metric([index, uuid], memory.used)
            total.add_metric([index, uuid], memory.total)
        yield from (util, used, total)


def register_gpu_metrics(registry: CollectorRegistry = REGISTRY) -> bool:
    """Export NVML metrics if this host has NVIDIA GPUs; False (and nothing registered) if not."""
    try:
        import pynvml

        pynvml.nvmlInit()
        collector = GpuCollector(pynvml)
    except Exception as e:  # no driver, no library, no device: a CPU host
        log.info("no GPU metrics: %s", e)
        return False
    if not collector._gpus:
        return False
    registry.register(collector)
    log.info("exporting NVML metrics for %d GPU(s)", len(collector._gpus))
    return True


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
