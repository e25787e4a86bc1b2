"""Turning a request's `prompt` or `messages` into token ids, the same way in API and worker.

The API needs the count to reject over-long prompts before anything is enqueued; the worker
hands the ids to the engine. One function keeps the two from ever disagreeing.
"""

from __future__ import annotations

from typing import Any

from shared.messages import PromptInput


def prompt_token_ids(tokenizer: Any, request: PromptInput) -> list[int]:
    if request.messages is not None:
        text = tokenizer.apply_chat_template(
            [m.model_dump() for m in request.messages], add_generation_prompt=True, tokenize=False
        )
        # The template already holds the special tokens it wants.
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(request.prompt, add_special_tokens=True)
