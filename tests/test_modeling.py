"""NVLM_D_Model's structure (the released checkpoint's tensors), training forward, and its boundary checks."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights

from nvlm_d.configuration_nvlm_d import NVLM_D_Config
from nvlm_d.modeling_nvlm_d import NVLM_D_Model
from nvlm_d.tiny import build_tiny_model, tiny_config

IMAGE_TOKEN = 151654
RELEASED_PARAMETER_COUNT = 79_379_593_344


@pytest.fixture(scope="module")
def meta_72b(reference_dir):
    config = NVLM_D_Config(**json.loads((reference_dir / "nvlm_d_72b_config.json").read_text()))
    with init_empty_weights():
        return NVLM_D_Model(config)


@pytest.fixture(scope="module")
def released_shapes(reference_dir) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (reference_dir / "nvlm_d_72b_weight_shapes.tsv").read_text().splitlines():
        name, shape = line.split("\t")
        shapes[name] = tuple(int(size) for size in shape.split("x"))
    return shapes


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0)


def _prompt_ids(num_tiles: int, num_image_token: int = 256) -> torch.Tensor:
    return torch.tensor([[151644, 872, 198] + [IMAGE_TOKEN] * (num_tiles * num_image_token) + [9707, 1879, 151645]])


def test_72b_model_has_exactly_the_released_tensor_names_and_shapes(meta_72b, released_shapes):
    ours = {name: tuple(tensor.shape) for name, tensor in meta_72b.state_dict().items()}
    assert len(ours) == 1556
    assert ours == released_shapes


def test_72b_model_has_the_released_parameter_count(meta_72b):
    assert sum(p.numel() for p in meta_72b.parameters()) == RELEASED_PARAMETER_COUNT


def test_vision_attention_is_padded_with_seven_dummy_heads(meta_72b):
    attn = meta_72b.vision_model.encoder.layers[0].attn
    assert tuple(attn.qkv.weight.shape) == (3 * 32 * 128, 3200)
    assert tuple(attn.q_norm.weight.shape) == tuple(attn.k_norm.weight.shape) == (4096,)
    assert tuple(attn.proj.weight.shape) == (3200, 4096)
    assert attn.qkv.bias is None


def test_projector_is_layernorm_linear_gelu_linear_without_biases(meta_72b):
    norm, up, act, down = meta_72b.mlp1
    assert isinstance(norm, torch.nn.LayerNorm) and norm.normalized_shape == (12800,)
    assert (up.in_features, up.out_features, up.bias) == (12800, 29568, None)
    assert isinstance(act, torch.nn.GELU)
    assert (down.in_features, down.out_features, down.bias) == (29568, 8192, None)


def test_each_tile_becomes_256_decoder_tokens(model):
    features = model.extract_feature(torch.randn(3, 3, 448, 448))
    assert tuple(features.shape) == (3, 256, model.config.llm_config.hidden_size)


def test_float32_pixel_values_run_on_a_bfloat16_vision_tower():
    bf16_model = build_tiny_model(seed=0).to(torch.bfloat16)
    features = bf16_model.extract_feature(torch.randn(1, 3, 448, 448, dtype=torch.float32))
    assert features.dtype == torch.bfloat16


def test_forward_with_labels_gives_a_finite_loss_and_gradients_reach_every_tensor():
    model = build_tiny_model(seed=1).train()
    input_ids = _prompt_ids(num_tiles=2)
    labels = input_ids.clone()
    labels[:, :-3] = -100
    output = model(pixel_values=torch.randn(2, 3, 448, 448), input_ids=input_ids, labels=labels)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    # the embedding rows of tokens absent from the batch get no gradient, but the matrix as a whole does
    assert without_grad == []


def test_image_flags_drop_padding_tiles(model):
    pixel_values = torch.randn(3, 3, 448, 448)
    flags = torch.tensor([[1], [0], [1]])
    with torch.no_grad():
        flagged = model(pixel_values=pixel_values, input_ids=_prompt_ids(2), image_flags=flags).logits
        kept = model(pixel_values=pixel_values[[0, 2]], input_ids=_prompt_ids(2)).logits
    torch.testing.assert_close(flagged, kept)


def test_text_only_forward_needs_no_images(model):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[9707, 1879]])).logits
    assert tuple(logits.shape) == (1, 2, 152064)


def test_select_layer_picks_an_earlier_vision_hidden_state():
    last = build_tiny_model(seed=0)
    earlier = build_tiny_model(seed=0, select_layer=-2)
    pixel_values = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        hidden = earlier.vision_model(pixel_values, output_hidden_states=True).hidden_states
        assert len(hidden) == earlier.config.vision_config.num_hidden_layers + 1
        assert not torch.allclose(last.extract_feature(pixel_values), earlier.extract_feature(pixel_values))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 448, 448), r"\[num_tiles, 3, 448, 448\], got \[3, 448, 448\]"),
        ((1, 4, 448, 448), r"got \[1, 4, 448, 448\]"),
        ((1, 3, 224, 224), r"got \[1, 3, 224, 224\]"),
        ((0, 3, 448, 448), r"got \[0, 3, 448, 448\]"),
    ],
)
def test_pixel_values_of_the_wrong_shape_are_rejected_naming_both_shapes(model, shape, message):
    with pytest.raises(ValueError, match=message):
        model(pixel_values=torch.randn(shape), input_ids=_prompt_ids(1))


def test_integer_pixel_values_are_rejected(model):
    with pytest.raises(TypeError, match="floating-point"):
        model(pixel_values=torch.zeros(1, 3, 448, 448, dtype=torch.uint8), input_ids=_prompt_ids(1))


def test_image_token_count_that_does_not_match_the_images_is_rejected(model):
    with pytest.raises(ValueError, match="512 image tokens .* 256 features"):
        model(pixel_values=torch.randn(1, 3, 448, 448), input_ids=_prompt_ids(2))


def test_input_ids_and_inputs_embeds_together_are_rejected(model):
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))


def test_attn_implementation_reaches_both_towers():
    model = NVLM_D_Model(tiny_config(attn_implementation="eager"))
    assert model.vision_model.config._attn_implementation == "eager"
    assert model.language_model.config._attn_implementation == "eager"


def test_sdpa_is_the_default_attention_of_both_towers(model):
    assert model.vision_model.config._attn_implementation == "sdpa"
    assert model.language_model.config._attn_implementation == "sdpa"


def test_use_flash_attn_without_flash_attn_installed_falls_back_to_sdpa(monkeypatch):
    from nvlm_d import modeling_nvlm_d

    monkeypatch.setattr(modeling_nvlm_d, "is_flash_attn_2_available", lambda: False)
    model = NVLM_D_Model(tiny_config(), use_flash_attn=True)
    assert model.vision_model.config._attn_implementation == "sdpa"
    assert model.language_model.config._attn_implementation == "sdpa"
