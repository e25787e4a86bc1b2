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
        request(extra=1),
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
