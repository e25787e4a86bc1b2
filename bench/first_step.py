"""The engine's first step alone: does a new prompt length or an idle pause make it slow?

Offline vLLM (`vllm.LLM`) with the worker's engine arguments, one request of `max_tokens=1` at a
time, so each timing is one prefill step: first over prompt lengths seen and unseen before, then
after idle pauses of growing length. Used to tell the ~1 s first steps of the serving benchmark
(docs/BENCHMARKS.md §1) from shape compilation or wake-up costs.

    sluice bench first-step [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.serving import machine

LENGTHS = [9, 10, 11, 12, 9, 10, 11, 12, 37, 37, 58, 58, 9]
PAUSES_S = [0, 0, 4, 6, 8, 10, 12, 14, 16, 18]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sluice bench first-step", description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from shared.settings import Settings
    from workers.engines.vllm import engine_args

    llm = LLM(**engine_args(Settings()))
    params = SamplingParams(max_tokens=1, temperature=0)

    def step_ms(n: int) -> float:
        start = time.perf_counter()
        prompt = TokensPrompt(prompt_token_ids=list(range(100, 100 + n)))
        llm.generate([prompt], params, use_tqdm=False)
        return (time.perf_counter() - start) * 1000

    by_length = [{"prompt_tokens": n, "ms": step_ms(n)} for n in LENGTHS]
    after_pause = []
    for i, pause in enumerate(PAUSES_S):
        time.sleep(pause)
        after_pause.append({"pause_s": pause, "ms": step_ms(LENGTHS[i % 2])})
    report = {"by_length": by_length, "after_pause": after_pause, "machine": machine()}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":  # vLLM's engine processes are spawned: they import this module
    main()
