"""Write vLLM's own greedy completions as JSON.

    python greedy_reference.py OUT.json MAX_TOKENS PROMPT...

Plain offline vLLM (`vllm.LLM`), none of Sluice's code on the generation path, with the engine
settings the worker uses; the end-to-end tests compare what clients receive against this.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    from shared.settings import Settings
    from workers.engines.vllm import engine_args

    settings = Settings()  # SLUICE_* from the environment, as a worker would read them
    out, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    llm = LLM(**engine_args(settings))
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens))
    result = {
        "texts": {p: o.outputs[0].text for p, o in zip(prompts, outputs, strict=True)},
        "quantization": llm.llm_engine.model_config.quantization,
        "dtype": str(llm.llm_engine.model_config.dtype),
    }
    # A file, not stdout: vLLM logs to stdout.
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
