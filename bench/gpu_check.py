"""GPU check for the transformers continuous-batching engine, with dummy weights.

Like vLLM's `--load-format dummy`: the model is built from its config with random weights, so
no weights travel; outputs have fixed lengths (EOS disabled). For each model shape and
precision it reports tokens/s at each concurrency, TTFT p50, GPU utilization under load (NVML)
and memory (weights, peak). Runs on CPU too, with `--tiny`, to check the script itself.

    python bench/gpu_check.py [--tiny] [--concurrency 1 16 64] [--new-tokens 128] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from dataclasses import dataclass
from inspect import signature
from typing import Any

import torch
from transformers import (
    ContinuousBatchingConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

# The default model's shape (SmolLM2-135M-Instruct) and a Llama-2-7B shape.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                 max_position_embeddings=512, tie_word_embeddings=True),
}  # fmt: skip
PROMPT_LEN = 128
PAGE_SIZE = 256


class Utilization:
    """Samples the GPU's utilization (NVML) in a thread while a load runs."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:
            pass  # no GPU or no NVML: utilization is reported as absent

    def __enter__(self) -> Utilization:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


@dataclass
class Load:
    concurrency: int
    tokens_per_s: float
    ttft_p50_ms: float
    gpu_util_pct: float | None


def build(shape: str, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        **SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    model.generation_config = GenerationConfig(
        max_new_tokens=1, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    return model


def run_load(manager: Any, vocab: int, concurrency: int, new_tokens: int) -> Load:
    """`concurrency` requests at once through the continuous-batching manager, streamed."""
    prompts = [torch.randint(3, vocab, (PROMPT_LEN,)).tolist() for _ in range(concurrency)]
    first_token: dict[str, float] = {}
    generated = 0
    with Utilization() as util:
        start = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=new_tokens, streaming=True) for p in prompts]
        done = 0
        while done < len(ids):
            out = manager.get_result(timeout=120)
            if out is None:
                raise RuntimeError("the continuous batching manager produced nothing in 120 s")
            first_token.setdefault(out.request_id, time.perf_counter() - start)
            if out.is_finished():
                if out.error:
                    raise RuntimeError(out.error)
                done += 1
                generated += len(out.generated_tokens)
        wall = time.perf_counter() - start
    if generated != concurrency * new_tokens:  # EOS is off: every request runs to its length
        raise RuntimeError(f"generated {generated} tokens, expected {concurrency * new_tokens}")
    return Load(
        concurrency=concurrency,
        tokens_per_s=generated / wall,
        ttft_p50_ms=statistics.median(first_token.values()) * 1000,
        gpu_util_pct=util.mean(),
    )


def measure(
    shape: str, dtype: torch.dtype, device: str, concurrency: list[int], new_tokens: int
) -> dict:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(shape, dtype, device)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    vocab = model.config.vocab_size
    # A KV cache sized to the largest load, the same for every precision, so that peak memory
    # compares precisions rather than "90% of whatever is free" (the manager's default).
    tokens = max(concurrency) * (PROMPT_LEN + new_tokens)
    # transformers renamed block_size to page_size (5.19); take whichever this version has.
    size_arg = (
        "page_size"
        if "page_size" in signature(ContinuousBatchingConfig).parameters
        else "block_size"
    )
    cb_config = ContinuousBatchingConfig(
        **{size_arg: PAGE_SIZE}, num_blocks=-(-tokens // PAGE_SIZE) + 8, max_batch_tokens=4096
    )
    manager = model.init_continuous_batching(continuous_batching_config=cb_config)
    manager.start()
    try:
        run_load(manager, vocab, 2, 8)  # warm-up: kernels, allocator, cache
        loads = [run_load(manager, vocab, c, new_tokens) for c in concurrency]
    finally:
        manager.stop(block=True)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    model.destroy_cached_continuous_batching_manager()
    del model, manager
    return {
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "weights_mib": round(weights / 2**20, 1),
        "peak_allocated_mib": round(peak / 2**20, 1) if peak is not None else None,
        "loads": [vars(load) for load in loads],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, to test on CPU")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        plan = [("tiny", torch.float32)]
    else:
        plan = [("smollm2-135m", torch.float32), ("smollm2-135m", torch.bfloat16),
                ("smollm2-135m", torch.float16), ("llama-2-7b", torch.bfloat16),
                ("llama-2-7b", torch.float16)]  # fmt: skip
    env = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "prompt_tokens": PROMPT_LEN, "new_tokens": args.new_tokens}  # fmt: skip
    print(json.dumps(env), flush=True)
    results = []
    for shape, dtype in plan:
        result = measure(shape, dtype, device, args.concurrency, args.new_tokens)
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
