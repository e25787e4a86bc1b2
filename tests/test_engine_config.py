"""Engine options that change how vLLM is built, each run for real on the default model."""

from pathlib import Path

import pytest

from shared.settings import Settings
from tests.conftest import vllm_reference
from workers.engines.vllm import engine_args


def test_int8_weight_only_runs_in_vllm(model_ready: None, tmp_path: Path) -> None:
    prompt = "The capital of France is"
    result = vllm_reference(tmp_path, [prompt], 8, env={"SLUICE_QUANTIZATION": "int8"})
    assert result["quantization"] == "torchao"
    assert result["dtype"] == "torch.bfloat16"
    assert "Paris" in result["texts"][prompt]


@pytest.mark.parametrize(
    ("quantization", "expected"), [("none", None), ("fp8", "fp8"), ("int8", "torchao")]
)
def test_quantization_setting_maps_to_vllm(quantization: str, expected: str | None) -> None:
    args = engine_args(Settings(model="/any/hf/dir", quantization=quantization))
    assert args.get("quantization") == expected


async def test_int8_weight_only_runs_in_the_transformers_engine(model_ready: None) -> None:
    from torchao.utils import TorchAOBaseTensor

    from tests.test_transformers_engine import request, run
    from workers.engines.transformers import TransformersEngine

    engine = TransformersEngine.start(Settings(quantization="int8"))
    try:
        proj = engine._model.model.layers[0].self_attn.q_proj.weight
        assert isinstance(proj, TorchAOBaseTensor)  # quantized, not merely cast
        text, _, _ = await run(engine, request("The capital of France is", max_tokens=8))
        assert "Paris" in text
    finally:
        await engine.shutdown()
