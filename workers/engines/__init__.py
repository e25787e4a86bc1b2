"""Engine backends, one file each; `start` picks one by `SLUICE_ENGINE`."""

from __future__ import annotations

from shared.settings import Settings
from workers.engines.base import Engine


def start(settings: Settings) -> Engine:
    # Imported here: each backend pulls in its own heavy library, and a host may lack vLLM.
    if settings.engine == "transformers":
        from workers.engines.transformers import TransformersEngine

        return TransformersEngine.start(settings)
    from workers.engines.vllm import VllmEngine

    return VllmEngine.start(settings)
