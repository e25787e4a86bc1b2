"""Hugging Face transformers backend: its continuous-batching manager, for hosts without vLLM.

The manager runs the batch loop in its own thread (paged KV cache, prefix sharing, chunked
prefill) and hands outputs back to our event loop through per-request result handlers.
What it does not do, this file does: detokenizing, stop strings, finish reasons, length checks.

Sampling is one global switch in the manager, so it always samples, with per-request
temperature/top-k/top-p; a greedy request (temperature 0) gets top_k=1, which leaves exactly
the argmax to sample. Per-request seeds are not supported here and are refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from shared.messages import GenerationRequest
from shared.models import model_path
from shared.prompts import prompt_token_ids
from shared.settings import Settings
from workers.engines.base import Delta, EngineDead, RequestRejected

_FINISHED = object()  # queued for a request that was aborted: the manager sends nothing more


# The request fields behind each feature it cannot honour
_FIELDS = {
    "structured_output": "response_format",
    "penalties": "presence_penalty/frequency_penalty/repetition_penalty",
    "stop_token_ids": "stop_token_ids",
    "logprobs": "logprobs",
}


class TransformersEngine:
    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, manager: Any, settings: Settings) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._manager = manager
        self._max_model_len = settings.max_model_len
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self.model = settings.model

    @classmethod
    def start(cls, settings: Settings) -> TransformersEngine:
        model, tokenizer = load_model(settings)
        manager = model.init_continuous_batching(
            generation_config=generation_config(tokenizer, model.config.vocab_size),
            continuous_batching_config=cb_config(settings, model),
        )
        manager.start()
        return cls(model, tokenizer, manager, settings)

    async def generate(
        self, request: GenerationRequest, priority: int = 0, resume: list[int] | None = None
    ) -> AsyncIterator[Delta]:
        # `priority` is ignored: the manager schedules first come, first served. Here only the
        # worker's poll order and batch level (SLUICE_BATCH_MAX_IN_FLIGHT) favour interactive.
        s = request.sampling
        if s.seed is not None:
            raise RequestRejected("seed is not supported by the transformers engine")
        if needed := s.features():
            fields = ", ".join(_FIELDS[f] for f in needed)
            raise RequestRejected(
                f"{fields}: not supported by the transformers engine (SLUICE_ENGINE=vllm is)"
            )
        ids = prompt_token_ids(self._tokenizer, request)
        if len(ids) + s.max_tokens > self._max_model_len:
            raise RequestRejected(
                f"prompt ({len(ids)} tokens) + max_tokens ({s.max_tokens}) exceeds the "
                f"model's context length ({self._max_model_len})"
            )
        resume = resume or []
        if len(resume) >= s.max_tokens:
            yield Delta(text="", num_tokens=0, prompt_tokens=len(ids), finish_reason="length")
            return
        rid = request.request_id
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[rid] = queue
        self._manager.register_result_handler(rid, queue.put_nowait)
        accepted = self._manager.add_request(
            ids + resume,
            request_id=rid,
            max_new_tokens=s.max_tokens - len(resume),
            streaming=True,
            eos_token_id=-1 if s.ignore_eos else self._tokenizer.eos_token_id,
            **per_request_sampling(s.temperature, s.top_p, self._model.config.vocab_size),
        )
        if accepted is None:
            self._queues.pop(rid, None)
            raise EngineDead("the continuous batching manager is not accepting requests")
        try:
            new_max = s.max_tokens - len(resume)
            async for delta in self._deltas(rid, queue, len(ids), s.stop, new_max):
                yield delta
        finally:
            if rid in self._queues:  # the consumer went away before the end
                self._cancel(rid)

    async def _deltas(
        self, rid: str, queue: asyncio.Queue[Any], n_prompt: int, stop: list[str], max_tokens: int
    ) -> AsyncIterator[Delta]:
        sent_text, sent_tokens = "", 0
        while True:
            out = await queue.get()
            if out is _FINISHED:
                return
            if out.error:
                if not self._manager.is_running():
                    raise EngineDead(out.error)
                raise RequestRejected(out.error)
            tokens = out.generated_tokens
            text = self._tokenizer.decode(tokens, skip_special_tokens=True)
            finish = None
            hit = _first_stop(text, stop, len(sent_text))
            if hit is not None:
                text, finish = text[:hit], "stop"
                self._cancel(rid)
            elif out.is_finished():
                finish = "length" if len(tokens) >= max_tokens else "stop"
            elif text.endswith("\ufffd"):
                continue  # half a multi-byte character: wait for the rest
            else:
                # Hold back what could still become a stop string, as vLLM does.
                text = text[: len(text) - _held_back(text, stop)]
            if finish is not None or len(text) > len(sent_text) or len(tokens) > sent_tokens:
                yield Delta(
                    text=text[len(sent_text) :],
                    num_tokens=len(tokens) - sent_tokens,
                    prompt_tokens=n_prompt,
                    finish_reason=finish,
                    token_ids=tuple(tokens[sent_tokens:]),
                )
                sent_text, sent_tokens = text, len(tokens)
            if finish is not None:
                return

    async def abort(self, request_id: str) -> None:
        queue = self._cancel(request_id)
        if queue is not None:
            queue.put_nowait(_FINISHED)

    def _cancel(self, rid: str) -> asyncio.Queue[Any] | None:
        """Stop generating `rid`. The manager delivers nothing for a cancelled request, so its
        result handler (normally dropped on the final output) is dropped here."""
        queue = self._queues.pop(rid, None)
        if queue is not None:
            self._manager.cancel_request(rid)
            router = self._manager.output_router
            with router._lock:
                router.result_handlers.pop(rid, None)
        return queue

    def num_running(self) -> int:
        return len(self._queues)

    async def restart(self) -> None:
        raise EngineDead("the transformers engine cannot be restarted in place")

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._manager.stop, block=True, timeout=30)


def load_model(settings: Settings) -> tuple[Any, Any]:
    """The model and tokenizer with Sluice's precision settings (also used by benchmarks)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(settings)
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    if settings.quantization == "int8":
        # The same weight-only INT8 as the vLLM backend, quantized by torchao at load time.
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        int8 = TorchAoConfig(Int8WeightOnlyConfig())
        kwargs.update(dtype=torch.bfloat16, quantization_config=int8)
    elif settings.quantization != "none":
        raise ValueError(
            f"SLUICE_QUANTIZATION={settings.quantization} is not supported by the transformers "
            "engine (none or int8)"
        )
    else:
        kwargs["dtype"] = getattr(torch, settings.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def generation_config(tokenizer: Any, vocab_size: int) -> Any:
    """Defaults that make the manager build temperature/top-k/top-p processors; every request
    overrides all three (a processor is only built when its default is not neutral)."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=0.5,
        top_k=vocab_size,
        top_p=0.99,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )


def per_request_sampling(temperature: float, top_p: float, vocab_size: int) -> dict[str, Any]:
    if temperature == 0.0:  # greedy: only the argmax survives top-k, so sampling picks it
        return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"temperature": temperature, "top_k": vocab_size, "top_p": top_p}


def cb_config(settings: Settings, model: Any) -> Any:
    """Map Sluice's engine settings onto the manager's. The KV cache is sized explicitly on CPU:
    left to itself the manager takes 90% of free memory, which on a CPU host is the host's."""
    import torch
    from transformers import ContinuousBatchingConfig

    page = settings.block_size or 256
    kwargs: dict[str, Any] = dict(
        page_size=page,
        max_batch_tokens=settings.max_num_batched_tokens,
        max_requests_per_batch=settings.max_num_seqs,
        allow_block_sharing=settings.enable_prefix_caching,
        per_request_processors=True,
    )
    if torch.cuda.is_available():
        kwargs["max_memory_percent"] = settings.gpu_memory_utilization
    else:
        block_bytes = page * kv_bytes_per_token(model)
        kwargs["num_blocks"] = max(1, settings.kv_cache_space_gib * 2**30 // block_bytes)
    return ContinuousBatchingConfig(**kwargs)


def kv_bytes_per_token(model: Any) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


def _first_stop(text: str, stop: list[str], searched_to: int) -> int | None:
    """Index at which the earliest stop string starts, looking only at text not yet sent."""
    hits = []
    for s in stop:
        i = text.find(s, searched_to)
        if i >= 0:
            hits.append(i)
    return min(hits) if hits else None


def _held_back(text: str, stop: list[str]) -> int:
    """How many trailing characters are a proper prefix of some stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
