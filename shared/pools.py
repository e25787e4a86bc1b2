"""Model pools: each model of the catalog is served by its own pool of workers, reading its
own topics in its own consumer groups, so each pool is sized, scaled (KEDA on its topic's lag)
and priced on its own, and a request reaches only workers that hold its model.

The default model (SLUICE_MODEL) keeps today's names (`sluice.requests`, `sluice-workers`...),
so single-model deployments, batch submitters and KEDA objects are unchanged. Another model
NAME gets the same names with its slug appended (`sluice.requests.<slug>`): a worker started
with `--model NAME` runs with `pool_settings(settings, NAME)` and is otherwise the same worker.
"""

from __future__ import annotations

import re

from shared.settings import Settings


class UnknownModel(KeyError):
    pass


class Misrouted(Exception):
    """A request for another model than the worker's pool serves: dead-lettered, never run
    (a producer wrote it to the wrong topic)."""


def check_model(requested: str | None, settings: Settings) -> None:
    if requested is not None and requested != settings.model:
        raise Misrouted(f"the request is for model {requested}; this pool serves {settings.model}")


def slug(name: str) -> str:
    """A topic- and group-safe name: `org/Model-1.5B` -> `org-model-1-5b`."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


def names(settings: Settings) -> list[str]:
    """Every model served, the default first."""
    return [settings.model, *(n for n in settings.models if n != settings.model)]


def pool_settings(settings: Settings, name: str) -> Settings:
    """The settings of the pool serving `name` (UnknownModel if the catalog lacks it)."""
    if name == settings.model:
        return settings
    spec = settings.models.get(name)
    if spec is None:
        raise UnknownModel(name)
    tail = f".{slug(name)}"
    overrides = spec.model_dump(exclude_none=True)
    update = {
        "model": name,
        "model_weights": overrides.pop("weights", None),
        "requests_topic": settings.requests_topic + tail,
        "consumer_group": settings.consumer_group + tail,
        "batch_requests_topic": settings.batch_requests_topic + tail,
        "batch_consumer_group": settings.batch_consumer_group + tail,
        **overrides,
    }
    return settings.model_copy(update=update)
