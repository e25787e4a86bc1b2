"""`sluice batch submit` / `collect` against a stack with a real vLLM worker."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.batch import read_requests
from shared.devstack import LocalStack
from shared.messages import BatchResult
from shared.settings import Settings

LINES = [
    {"correlation": "capital", "prompt": "The capital of France is", "max_tokens": 8,
     "temperature": 0},
    {"correlation": "chat", "messages": [{"role": "user", "content": "What is the capital of "
     "France?"}], "max_tokens": 16, "temperature": 0},
    {"correlation": "count", "prompt": "Count: 1, 2, 3, 4,", "max_tokens": 12, "temperature": 0,
     "stop": " 8"},
]  # fmt: skip


def sluice(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("sluice")
    return subprocess.run(
        [str(cli), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **stack.env},
    )


def write_jsonl(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.stack
async def test_submit_and_collect_a_batch_file(stack: LocalStack, tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", LINES)
    run = await asyncio.to_thread(sluice, stack, "batch", "submit", str(jobs), "--wait",
                                  "--timeout", "300")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ids = (tmp_path / "jobs.ids").read_text().split()
    assert len(ids) == 3 and len(set(ids)) == 3
    waited = [
        BatchResult.model_validate_json(line)
        for line in (tmp_path / "jobs.results.jsonl").read_text().splitlines()
    ]
    # In submission order, each with its correlation and text from the model.
    assert [r.request_id for r in waited] == ids
    assert [r.correlation for r in waited] == ["capital", "chat", "count"]
    by = {r.correlation: r for r in waited}
    assert "Paris" in by["capital"].text and "Paris" in by["chat"].text
    assert "5" in by["count"].text and " 8" not in by["count"].text
    assert by["count"].finish_reason == "stop"
    for r in waited:
        assert r.error is None and r.text.strip()
        assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
        assert r.cost_usd is not None and r.cost_usd > 0

    # collect reads the results topic again from the start, with a consumer of its own.
    out = tmp_path / "collected.jsonl"
    run = await asyncio.to_thread(sluice, stack, "batch", "collect", "--ids",
                                  str(tmp_path / "jobs.ids"), "--out", str(out),
                                  "--timeout", "60")  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.read_text() == (tmp_path / "jobs.results.jsonl").read_text()


def test_a_bad_line_is_named_and_nothing_is_sent(tmp_path: Path) -> None:
    jobs = write_jsonl(tmp_path / "jobs.jsonl", [LINES[0], {"prompt": "hi", "best_of": 2}])
    with pytest.raises(ValueError, match=r"jobs.jsonl:2: best_of"):
        read_requests(jobs, Settings())
    too_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "hi", "max_tokens": 10**6}])
    with pytest.raises(ValueError, match=r"long.jsonl:1: max_tokens"):
        read_requests(too_long, Settings())
    requests = read_requests(write_jsonl(tmp_path / "ok.jsonl", LINES), Settings(), "acme")
    assert [r.correlation for r in requests] == ["capital", "chat", "count"]
    assert requests[2].sampling.stop == [" 8"] and requests[0].tenant == "acme"
    assert len({r.request_id for r in requests}) == 3


def test_settings_name_the_batch_topics() -> None:
    s = Settings()
    assert s.batch_dlq_topic == "sluice.batch.requests.dlq"
    assert s.cancelled_key("r1") == "sluice:cancelled:r1"
