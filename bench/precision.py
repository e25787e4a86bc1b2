"""Benchmark 2: precision and quantization in vLLM: float32 vs bfloat16 vs int8 (weight-only).

Each precision runs in its own process (so peak memory is its own), with the engine settings
a worker would use (`engine_args`). Each one reports:
- weight bytes with that precision/quantization config (quantized tensors counted by their real
  storage; see `weight_bytes` for why on the transformers model);
- peak resident memory of the process (engine and KV cache included, same KV size for all);
- output tokens/s: `--concurrency` greedy requests of `--max-tokens` tokens, after a warm-up;
- perplexity on a fixed text (bench/data/perplexity.txt, vLLM's prompt logprobs);
- greedy outputs of 50 prompts; the parent reports the exact-match rate against float32.

    sluice bench precision [--precisions float32 bfloat16 int8] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.serving import machine

TEXT = Path(__file__).with_name("data") / "perplexity.txt"
TOPICS = ["the sea", "a lighthouse", "autumn", "a robot", "the moon", "a market", "rain",
          "a violin", "mountains", "a library", "a train", "winter", "a garden", "a city",
          "the desert", "a bridge", "a volcano"]  # fmt: skip
PROMPTS = (
    [f"Write a short story about {t}." for t in TOPICS]
    + [f"Explain in one paragraph how {t} changes over a year." for t in TOPICS]
    + [f"List three facts about {t}:" for t in TOPICS[:16]]
)
assert len(PROMPTS) == 50
QUALITY_MAX_TOKENS = 32
WINDOW = 1024  # perplexity window (tokens)


def weight_bytes(model: Any) -> int:
    """Bytes the weights occupy. torchao's quantized tensors are wrapper subclasses whose
    element_size() is the logical dtype's, so their inner tensors are counted instead.

    Counted on the transformers model built with the same settings (and the same torchao
    config): vLLM-CPU hands its linear weights to oneDNN as opaque packed handles, so its
    modules no longer hold them as tensors."""

    def nbytes(t: Any) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += nbytes(t.data if hasattr(t, "data") else t)
    return total


def settings_for(precision: str) -> Any:
    from shared.settings import Settings

    if precision == "int8":
        return Settings(quantization="int8")
    return Settings(dtype=precision, quantization="none")


def transformers_weight_mib(precision: str) -> float:
    from workers.engines.transformers import load_model

    model, _ = load_model(settings_for(precision))
    return weight_bytes(model) / 2**20


def child(precision: str, args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams

    from workers.engines.vllm import engine_args

    llm = LLM(**engine_args(settings_for(precision)))
    tokenizer = llm.get_tokenizer()

    # Throughput: a warm-up batch, then the timed one.
    load = [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrency)]
    fixed = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(load[:2], fixed, use_tqdm=False)
    rates = []
    for _ in range(args.reps):
        start = time.perf_counter()
        outs = llm.generate(load, fixed, use_tqdm=False)
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start))

    # Perplexity over fixed windows of the text.
    ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)
    windows = [ids[i : i + WINDOW] for i in range(0, len(ids) - 1, WINDOW)]
    scored = llm.generate(
        [{"prompt_token_ids": w} for w in windows],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    nll = []
    for window, out in zip(windows, scored, strict=True):
        for token, logprobs in zip(window[1:], out.prompt_logprobs[1:], strict=True):
            nll.append(-logprobs[token].logprob)

    greedy = llm.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=QUALITY_MAX_TOKENS), use_tqdm=False
    )
    return {
        "precision": precision,
        "dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
        "quantization": llm.llm_engine.model_config.quantization,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_per_s": statistics.median(rates),
        "per_rep_tokens_per_s": rates,
        "perplexity": math.exp(statistics.fmean(nll)),
        "perplexity_tokens": len(nll),
        "outputs": [o.outputs[0].text for o in greedy],
    }


def run_child(precision: str, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{precision}.json"
    cmd = [sys.executable, "-m", "bench.precision", "--child", precision, "--child-out", str(out)]
    cmd += ["--concurrency", str(args.concurrency), "--max-tokens", str(args.max_tokens)]
    cmd += ["--reps", str(args.reps)]
    # One process holds engine and model, so its peak RSS is the whole footprint.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    result["weights_mib"] = transformers_weight_mib(precision)
    print(f"{precision}: done in {time.perf_counter() - start:.0f} s", flush=True)
    return result


def compare(results: list[dict]) -> list[dict]:
    base = next(r for r in results if r["precision"] == "float32")
    rows = []
    for r in results:
        same = sum(a == b for a, b in zip(r["outputs"], base["outputs"], strict=True))
        rows.append(
            {
                **{k: v for k, v in r.items() if k != "outputs"},
                "weights_vs_fp32": r["weights_mib"] / base["weights_mib"],
                "peak_rss_vs_fp32": r["peak_rss_mib"] / base["peak_rss_mib"],
                "tokens_per_s_vs_fp32": r["tokens_per_s"] / base["tokens_per_s"],
                "perplexity_vs_fp32": r["perplexity"] / base["perplexity"],
                "exact_match_vs_fp32": same / len(base["outputs"]),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| precision | weights MiB (vs fp32) | peak RSS MiB (vs fp32) | tok/s (vs fp32) "
        "| perplexity (vs fp32) | greedy exact match vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['precision']} | {r['weights_mib']:.0f} ({r['weights_vs_fp32'] - 1:+.0%}) "
            f"| {r['peak_rss_mib']:.0f} ({r['peak_rss_vs_fp32'] - 1:+.0%}) "
            f"| {r['tokens_per_s']:.1f} ({r['tokens_per_s_vs_fp32']:.2f}x) "
            f"| {r['perplexity']:.3f} ({r['perplexity_vs_fp32'] - 1:+.2%}) "
            f"| {r['exact_match_vs_fp32']:.0%} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["precision"] for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([x - 0.2 for x in xs], [r["weights_mib"] for r in rows], 0.4, label="weights")
    ax.bar([x + 0.2 for x in xs], [r["peak_rss_mib"] for r in rows], 0.4, label="peak RSS")
    ax.set_xticks(list(xs), labels=names)
    ax.set(ylabel="MiB", title="Memory by precision (vLLM, SmolLM2-135M)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    path = out.with_name(out.stem + "-memory.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sluice bench precision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16", "int8"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/precision-cpu.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.child_out.write_text(json.dumps(child(args.child, args)))
        return

    from shared.models import prepare_default_model
    from shared.settings import Settings

    prepare_default_model(Settings())
    with tempfile.TemporaryDirectory() as tmp:
        rows = compare([run_child(p, args, Path(tmp)) for p in args.precisions])
    report = {
        "results": rows,
        "config": {**vars(args), "out": str(args.out), "child_out": None,
                   "prompts": len(PROMPTS), "quality_max_tokens": QUALITY_MAX_TOKENS,
                   "text": str(TEXT), "machine": machine()},
    }  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(rows))
    print(f"wrote {plot(rows, args.out)}")


if __name__ == "__main__":
    main()
