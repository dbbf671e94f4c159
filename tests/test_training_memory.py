"""The weight-free fine-tuning memory planner counts what peft and the optimizer really hold."""

from __future__ import annotations

import pytest

from nvlm_d.device_map import build_meta_model
from nvlm_d.tiny import build_tiny_model, tiny_config
from nvlm_d.training.memory import TRAINED_STATE_BYTES, lora_parameters, training_memory

peft = pytest.importorskip("peft", reason="LoRA needs peft (pip install -e '.[train]')")


@pytest.fixture(scope="module")
def meta_model():
    return build_meta_model(tiny_config())


@pytest.mark.parametrize("frozen", [("vision",), ()])
def test_lora_parameters_equal_the_adapters_peft_creates(meta_model, frozen):
    from nvlm_d.training import apply_lora

    adapted = apply_lora(build_tiny_model(), r=4, frozen=frozen)
    created = sum(param.numel() for name, param in adapted.named_parameters() if "lora_" in name)
    assert lora_parameters(meta_model, 4, {"llm", "vision"} - set(frozen)) == created


def test_full_fine_tuning_trains_every_unfrozen_parameter_at_16_bytes(meta_model):
    plan = training_memory("full", 2, frozen=("vision",), model=meta_model)
    vision = sum(param.numel() for param in meta_model.vision_model.parameters())
    everything = sum(param.numel() for param in meta_model.parameters())
    assert plan.trained_params == everything - vision
    buffers = sum(buffer.numel() for buffer in meta_model.buffers())  # the rotary embedding's, stored in bf16
    # states: 16 bytes per trained parameter and 2 (bf16) per frozen one or buffer element, split over the GPUs
    assert plan.states_bytes == (plan.trained_params * TRAINED_STATE_BYTES + (vision + buffers) * 2) // 2


def test_qlora_is_planned_on_one_gpu_only(meta_model):
    with pytest.raises(ValueError, match="1 GPU"):
        training_memory("qlora", 2, model=meta_model)
    with pytest.raises(ValueError, match="recipe"):
        training_memory("adapters", 1, model=meta_model)
