"""A small LoRA adapter of the bundled model, made here rather than downloaded: random low-rank
updates of every layer's q_proj and v_proj, saved as PEFT saves one (adapter_config.json and
adapter_model.safetensors), and the same updates merged into a transformers copy of the model,
the reference the adapter's completions must match."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

RANK, ALPHA, SCALE = 8, 16, 0.1
TARGETS = ("q_proj", "v_proj")


def make_adapter(base: str, out: Path, seed: int = 0) -> Any:
    """Write the adapter into `out`; return the base model with it merged (transformers)."""
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, layer in enumerate(model.model.layers):
        for name in TARGETS:
            linear = getattr(layer.self_attn, name)
            a = torch.randn(RANK, linear.in_features, generator=g) * SCALE
            b = torch.randn(linear.out_features, RANK, generator=g) * SCALE
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
            linear.weight.data += (ALPHA / RANK) * (b @ a)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA,
        "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "base_model_name_or_path": base,
    }  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))
    return model.eval()


def greedy(model: Any, tokenizer: Any, prompt: str, max_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0][ids.shape[1] :], skip_special_tokens=True)
