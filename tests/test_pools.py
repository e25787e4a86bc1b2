"""The catalog (shared/pools.py): each model's pool names, adapters on their base's pool, and
the settings that refuse a catalog no pool could serve."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared import pools
from shared.messages import ADAPTER, GenerationRequest, SamplingOptions
from shared.settings import PoolSpec, Settings

CATALOG = {
    "org/Chat-7B": PoolSpec(weights="/w/chat", quantization="int8"),
    "chat-tune": PoolSpec(adapter_of="org/Chat-7B", weights="/adapters/chat-tune"),
    "small-tune": PoolSpec(adapter_of="small", weights="/adapters/small-tune"),
}


def settings(**models: PoolSpec) -> Settings:
    return Settings(model="small", models=models or CATALOG)


def test_each_model_has_its_own_topics_and_adapters_ride_on_their_base() -> None:
    s = settings()
    assert pools.names(s) == ["small", "org/Chat-7B"]  # pools: adapters have none
    assert pools.servable(s) == ["small", "org/Chat-7B", "chat-tune", "small-tune"]
    chat = pools.pool_settings(s, "org/Chat-7B")
    assert (chat.requests_topic, chat.consumer_group) == (
        "sluice.requests.org-chat-7b", "sluice-workers.org-chat-7b",
    )  # fmt: skip
    assert chat.model_weights == "/w/chat" and chat.quantization == "int8"
    assert pools.pool_settings(s, "chat-tune").requests_topic == chat.requests_topic
    assert pools.pool_settings(s, "small-tune") is s  # the default model's pool
    assert pools.adapters(chat) == {"chat-tune": "/adapters/chat-tune"}
    assert pools.adapters(s) == {"small-tune": "/adapters/small-tune"}
    with pytest.raises(pools.UnknownModel):
        pools.pool_settings(s, "nope")


def test_a_worker_refuses_what_another_pool_or_an_unknown_adapter_is_for() -> None:
    chat = pools.pool_settings(settings(), "org/Chat-7B")
    pools.check_model("org/Chat-7B", "chat-tune", chat)
    with pytest.raises(pools.Misrouted, match="small-tune"):
        pools.check_model("org/Chat-7B", "small-tune", chat)  # the default pool's adapter
    with pytest.raises(pools.Misrouted):
        pools.check_model("small", None, chat)
    # The wire message requires the feature: a worker from before adapters (to which
    # "adapter" is as unknown as "later-feature" is to this one) refuses it rather than
    # answering as the base model.
    request = GenerationRequest(
        request_id="r", prompt="hi", sampling=SamplingOptions(max_tokens=4), enqueued_at=0.0,
        adapter="chat-tune", requires=[ADAPTER],
    )  # fmt: skip
    later = request.model_dump(mode="json") | {"requires": [ADAPTER, "later-feature"]}
    with pytest.raises(ValidationError, match="later-feature"):
        GenerationRequest.model_validate(later)


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        (PoolSpec(adapter_of="small"), "takes `weights`"),
        (PoolSpec(adapter_of="small", weights="/a", dtype="bfloat16"), "takes `weights`"),
        (PoolSpec(adapter_of="nope", weights="/a"), "not a model of the catalog"),
        (PoolSpec(adapter_of="chat-tune", weights="/a"), "not a model of the catalog"),
        (PoolSpec(adapter_of="hf", weights="/a"), "needs a vllm pool"),
    ],
)
def test_the_catalog_refuses_adapters_no_pool_can_serve(spec: PoolSpec, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        settings(**CATALOG, hf=PoolSpec(engine="transformers"), bad=spec)
