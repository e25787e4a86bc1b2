"""Model pools: each model of the catalog is served by its own pool of workers, reading its
own topics in its own consumer groups, so each pool is sized, scaled (KEDA on its topic's lag)
and priced on its own, and a request reaches only workers that hold its model.

The default model (SLUICE_MODEL) keeps today's names (`sluice.requests`, `sluice-workers`...),
so single-model deployments, batch submitters and KEDA objects are unchanged. Another model
NAME gets the same names with its slug appended (`sluice.requests.<slug>`): a worker started
with `--model NAME` runs with `pool_settings(settings, NAME)` and is otherwise the same worker.

A LoRA adapter of the catalog (`adapter_of`) has no pool: its requests travel on its base
model's topic, naming the adapter, and that pool's engines load it (vLLM's LoRA), so one pool
serves a base model and any number of its fine-tunes.
"""

from __future__ import annotations

import re

from shared.settings import Settings


class UnknownModel(KeyError):
    pass


class Misrouted(Exception):
    """A request for another model than the worker's pool serves: dead-lettered, never run
    (a producer wrote it to the wrong topic)."""


def check_model(requested: str | None, adapter: str | None, settings: Settings) -> None:
    if requested is not None and requested != settings.model:
        raise Misrouted(f"the request is for model {requested}; this pool serves {settings.model}")
    if adapter is not None and adapter not in adapters(settings):
        raise Misrouted(f"adapter {adapter} is not one of {settings.model}'s in this catalog")


def slug(name: str) -> str:
    """A topic- and group-safe name: `org/Model-1.5B` -> `org-model-1-5b`."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


def names(settings: Settings) -> list[str]:
    """Every model with a pool of its own, the default first."""
    return [
        settings.model,
        *(n for n, spec in settings.models.items() if n != settings.model and not spec.adapter_of),
    ]


def servable(settings: Settings) -> list[str]:
    """Every name a request may give as `model`: the pools' models, then the adapters."""
    return [*names(settings), *(n for n, spec in settings.models.items() if spec.adapter_of)]


def adapters(settings: Settings) -> dict[str, str]:
    """The LoRA adapters the pool of `settings.model` serves: name -> directory."""
    return {
        name: spec.weights
        for name, spec in settings.models.items()
        if spec.adapter_of == settings.model and spec.weights is not None
    }


def base_of(settings: Settings, name: str) -> str:
    """The model whose pool serves `name`: an adapter's base model, else `name` itself."""
    spec = settings.models.get(name)
    return spec.adapter_of if spec is not None and spec.adapter_of else name


def pool_settings(settings: Settings, name: str) -> Settings:
    """The settings of the pool serving `name` (for an adapter: its base model's pool);
    UnknownModel if the catalog lacks it."""
    name = base_of(settings, name)
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
