"""Write vLLM's own greedy completions as JSON.

    python greedy_reference.py OUT.json MAX_TOKENS PROMPT...

Plain offline vLLM (`vllm.LLM`), none of Sluice's code on the generation path, with the engine
settings the worker uses; the end-to-end tests compare what clients receive against this.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    from shared.models import model_path
    from shared.settings import Settings

    settings = Settings()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_space_gib))
    out, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    llm = LLM(
        model=model_path(settings),
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        enforce_eager=settings.enforce_eager,
    )
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
    texts = {p: o.outputs[0].text for p, o in zip(prompts, outputs, strict=True)}
    # A file, not stdout: vLLM logs to stdout.
    with open(out, "w") as f:
        json.dump(texts, f)


if __name__ == "__main__":
    main()
