"""Inputs go where the module that reads them executes: offloaded towers (weights on `meta` until a hook loads them)
and quantized projectors answer as the plain model does."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, BitsAndBytesConfig

GREEDY = {"max_new_tokens": 6, "do_sample": False}
OFFLOADABLE = ["vision_model", "mlp1", "language_model.model.embed_tokens"]


def tiles(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


def device_map_with(module: str, where: str) -> dict[str, str]:
    device_map = {
        "vision_model": "cpu",
        "mlp1": "cpu",
        "language_model.model.embed_tokens": "cpu",
        "language_model.model.rotary_emb": "cpu",
        "language_model.model.layers": "cpu",
        "language_model.model.norm": "cpu",
        "language_model.lm_head": "cpu",
    }
    return {**device_map, module: where}


# (offloaded module, where, the images as): visual_features never reach the vision tower, so that pair is left out
PLACEMENTS = [
    (module, where, inputs)
    for module in OFFLOADABLE
    for where in ("cpu", "disk")
    for inputs in ("pixel_values", "visual_features")
    if not (module == "vision_model" and inputs == "visual_features")
]


@pytest.mark.parametrize(("module", "where", "inputs"), PLACEMENTS)
def test_an_offloaded_module_gets_its_inputs_on_its_execution_device(
    tiny_checkpoint, tiny_model, tokenizer, tmp_path, module, where, inputs
):
    placed = AutoModel.from_pretrained(
        tiny_checkpoint,
        trust_remote_code=True,
        dtype=torch.float32,
        device_map=device_map_with(module, where),
        offload_folder=tmp_path,
    ).eval()
    assert placed.device.type == "cpu"  # where inputs go, also when the first parameters are offloaded
    pixel_values = tiles(2, seed=1)
    if inputs == "visual_features":
        with torch.no_grad():
            features = tiny_model.get_visual_features(pixel_values)
        expected = tiny_model.chat(tokenizer, None, "Describe.", GREEDY, visual_features=features)
        assert placed.chat(tokenizer, None, "Describe.", GREEDY, visual_features=features) == expected
    else:
        expected = tiny_model.chat(tokenizer, pixel_values, "Describe.", GREEDY)
        assert placed.chat(tokenizer, pixel_values, "Describe.", GREEDY) == expected


def test_visual_features_work_with_a_quantized_projector(tiny_checkpoint, tokenizer):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    # unlike nvlm_d.bitsandbytes_config, this quantizes mlp1 too
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["vision_model", "lm_head"])
    model = AutoModel.from_pretrained(
        tiny_checkpoint,
        trust_remote_code=True,
        dtype=torch.bfloat16,
        device_map="cpu" if not torch.cuda.is_available() else 0,
        quantization_config=config,
    ).eval()
    assert isinstance(model.mlp1[1], bnb.nn.Linear8bitLt)
    with torch.no_grad():
        features = model.get_visual_features(tiles(1, seed=2))
    from_features = model.chat(tokenizer, None, "Describe.", GREEDY, visual_features=features)
    assert from_features == model.chat(tokenizer, tiles(1, seed=2), "Describe.", GREEDY)


def test_batch_chat_with_offloaded_decoder_layers_and_vision_tower_answers_as_the_plain_model(
    tiny_checkpoint, tiny_model, tokenizer, tmp_path
):
    """Prompts of different lengths are prefilled one by one into caches stacked for the batch: the stacked keys and
    values stay on the devices of the layers they belong to."""
    device_map = {**device_map_with("vision_model", "disk"), "language_model.model.layers": "disk"}
    placed = AutoModel.from_pretrained(
        tiny_checkpoint, trust_remote_code=True, dtype=torch.float32, device_map=device_map, offload_folder=tmp_path
    ).eval()
    questions = ["<image>\nWhat is it?", "Hi?"]
    expected = tiny_model.batch_chat(tokenizer, tiles(2, seed=3), questions, GREEDY, num_patches_list=[2, 0])
    assert placed.batch_chat(tokenizer, tiles(2, seed=3), questions, GREEDY, num_patches_list=[2, 0]) == expected
