"""The wire contract: what each side accepts and rejects."""

import pytest
from pydantic import ValidationError

from api.schemas import GenerateBody
from shared.messages import DoneEvent, GenerationRequest, TokensEvent, stream_event_adapter


def request(**overrides: object) -> dict:
    return {
        "request_id": "r1",
        "prompt": "hi",
        "sampling": {"max_tokens": 4},
        "enqueued_at": 1.0,
        **overrides,
    }


def test_request_round_trips_with_its_version() -> None:
    msg = GenerationRequest.model_validate(request())
    assert msg.v == 1
    assert GenerationRequest.model_validate_json(msg.model_dump_json()) == msg


@pytest.mark.parametrize(
    "bad",
    [
        request(v=2),
        request(prompt=None),
        request(messages=[]),
        request(requires=["tools"]),  # a feature this code does not have (tool calls)
        request(sampling={"max_tokens": 0}),
        request(request_id=""),
    ],
)
def test_request_rejects_what_a_worker_cannot_serve(bad: dict) -> None:
    with pytest.raises(ValidationError):
        GenerationRequest.model_validate(bad)


def test_stream_events_are_discriminated_by_type() -> None:
    tokens = TokensEvent(tokens=[{"index": 0, "text": "a"}])
    assert stream_event_adapter.validate_json(tokens.model_dump_json()) == tokens
    done = {
        "type": "done",
        "request_id": "r",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
        "timings": {"queue_ms": 1, "ttft_ms": 2, "e2e_ms": 3},
    }
    assert isinstance(stream_event_adapter.validate_python(done), DoneEvent)


def test_body_stop_accepts_a_string_like_openai() -> None:
    body = GenerateBody(prompt="x", stop="\n")
    assert body.sampling(16).stop == ["\n"]
    assert body.sampling(16).max_tokens == 16


# The evolution rule (shared/messages.py, docs/ARCHITECTURE.md): old and new sides of a
# rolling update read each other's messages.
V1_REQUEST_BEFORE_ISSUE_14 = (
    '{"v":1,"request_id":"9f","prompt":"Hi","messages":null,"sampling":{"max_tokens":8,'
    '"temperature":0.0,"top_p":1.0,"stop":[],"seed":null,"ignore_eos":false},'
    '"enqueued_at":1795900000.1,"deadline":null,"tenant":null,"correlation":null}'
)


def test_a_new_reader_reads_what_an_old_writer_wrote() -> None:
    msg = GenerationRequest.model_validate_json(V1_REQUEST_BEFORE_ISSUE_14)
    assert msg.requires == [] and msg.sampling.max_tokens == 8


def test_an_old_reader_ignores_informational_additions_at_every_level() -> None:
    newer = request(traceparent="00-abc-def-01", sampling={"max_tokens": 4, "logit_bias": {}})
    msg = GenerationRequest.model_validate(newer)
    assert msg.sampling.max_tokens == 4
    event = stream_event_adapter.validate_python(
        {"type": "tokens", "tokens": [{"index": 0, "text": "a", "logprob": -0.1}], "worker": "w"}
    )
    assert isinstance(event, TokensEvent) and event.tokens[0].text == "a"


def test_a_feature_that_changes_the_answer_is_refused_by_name_not_ignored() -> None:
    with pytest.raises(ValidationError, match="does not have: n"):
        GenerationRequest.model_validate(request(requires=["n"]))
    # Structured output is one this code has: it travels with its feature name.
    schema = {"name": "a", "schema": {"type": "object"}}
    rf = {"type": "json_schema", "json_schema": schema}
    msg = GenerationRequest.model_validate(
        request(requires=["structured_output"], sampling={"max_tokens": 8, "response_format": rf})
    )
    assert msg.sampling.structured() is not None
    assert GenerationRequest.model_validate_json(msg.model_dump_json()) == msg


def test_bodies_people_write_still_refuse_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        GenerateBody.model_validate({"prompt": "hi", "max_token": 4})
    with pytest.raises(ValidationError):
        GenerateBody.model_validate({"messages": [{"role": "user", "content": "x", "nme": 1}]})
