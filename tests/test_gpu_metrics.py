"""NVML metrics: absent on a host without an NVIDIA driver, well-formed where there is one.

The exposition test stands in for NVML, as there is no GPU in CI; the collector has not yet run
against a real driver (docs/OPTIMIZATION.md says so).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest

from workers.gpu import GpuCollector, register_gpu_metrics


def test_registered_only_where_an_nvidia_driver_is() -> None:
    registry = CollectorRegistry()
    has_driver = Path("/dev/nvidiactl").exists()
    assert register_gpu_metrics(registry) is has_driver
    exposed = generate_latest(registry).decode()
    assert ("sluice_gpu_utilization_ratio" in exposed) is has_driver


class TwoGpus:
    """The slice of the pynvml API the collector uses, with fixed readings."""

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return f"GPU-{handle}".encode()

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=[87, 0][handle], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=[3 * 2**30, 0][handle], total=80 * 2**30, free=0)


def test_exposition_per_gpu() -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector(TwoGpus()))
    exposed = generate_latest(registry).decode()
    assert 'sluice_gpu_utilization_ratio{gpu="0",uuid="GPU-0"} 0.87' in exposed
    assert 'sluice_gpu_utilization_ratio{gpu="1",uuid="GPU-1"} 0.0' in exposed
    assert 'sluice_gpu_memory_used_bytes{gpu="0",uuid="GPU-0"} 3.221225472e+09' in exposed
    assert 'sluice_gpu_memory_total_bytes{gpu="1",uuid="GPU-1"} 8.589934592e+10' in exposed
