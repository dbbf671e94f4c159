"""Numerics against implementations we did not write: transformers' own InternVL holding the same weights, and the
reference's formulas written out here (the dummy-head QK-norm and the pixel shuffle)."""

from __future__ import annotations

import pytest
import torch
from internvl_twin import internvl_twin

from nvlm_d.tiny import build_tiny_model, zero_dummy_heads_

IMAGE_TOKEN = 151654
RTOL = 1e-4


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(scope="module")
def models():
    ours = zero_dummy_heads_(build_tiny_model(seed=3, llm_config={"intermediate_size": 64}))
    return ours, internvl_twin(ours)


@pytest.fixture(scope="module")
def pixel_values():
    return torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))


def compute_every_head(model, monkeypatch) -> None:
    """Undo, for one test, the decision that the (zeroed) dummy heads are silent."""
    for layer in model.vision_model.encoder.layers:
        assert layer.attn.dummy_heads_silent
        monkeypatch.setattr(layer.attn, "dummy_heads_silent", False)


@pytest.mark.parametrize("dummy_heads", ["skipped", "computed"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_image_features_match_transformers_internvl(models, pixel_values, attn, dummy_heads, monkeypatch):
    ours, theirs = models
    ours.config._attn_implementation = theirs.config._attn_implementation = attn
    if dummy_heads == "computed":
        compute_every_head(ours, monkeypatch)
    with torch.no_grad():
        expected = theirs.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=-1, vision_feature_select_strategy="default"
        ).pooler_output
        actual = ours.extract_feature(pixel_values)
    assert relative_error(actual, expected) < RTOL


def test_logits_match_transformers_internvl(models, pixel_values):
    ours, theirs = models
    input_ids = torch.tensor([[151644, 872, 198] + [IMAGE_TOKEN] * 512 + [9707, 1879, 151645]])
    with torch.no_grad():
        expected = theirs(pixel_values=pixel_values, input_ids=input_ids).logits
        actual = ours(pixel_values=pixel_values, input_ids=input_ids).logits
    assert relative_error(actual, expected) < RTOL


def reference_attention(attn, hidden_states: torch.Tensor) -> torch.Tensor:
    """The reference InternAttention written out: all heads of a token share one QK-RMSNorm whose variance is the
    mean square of the first `hidden_size` channels; q is scaled, then softmax over keys, then `proj`."""
    tokens, width = hidden_states.shape[1], attn.embed_dim
    heads, head_dim, eps = attn.num_heads, attn.head_dim, attn.q_norm.variance_epsilon
    q, k, v = (hidden_states @ attn.qkv.weight.T).chunk(3, dim=-1)

    def qk_norm(x, weight):
        variance = x[..., :width].pow(2).sum(-1, keepdim=True) / width
        return weight * (x / torch.sqrt(variance + eps))

    q, k = qk_norm(q, attn.q_norm.weight), qk_norm(k, attn.k_norm.weight)
    q, k, v = (x.reshape(-1, tokens, heads, head_dim).transpose(1, 2) for x in (q, k, v))
    weights = torch.softmax((q * head_dim**-0.5) @ k.transpose(-1, -2), dim=-1)
    merged = (weights @ v).transpose(1, 2).reshape(-1, tokens, heads * head_dim)
    return merged @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attention_with_live_dummy_heads_matches_the_reference_formula(attn_implementation):
    model = build_tiny_model(seed=5)  # dummy heads random, not zero: they take part in the math
    model.config._attn_implementation = attn_implementation
    attn = model.vision_model.encoder.layers[0].attn
    hidden_states = torch.randn(2, 1025, attn.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        actual = attn(hidden_states)[0]
        expected = reference_attention(attn.double(), hidden_states.double())
    assert relative_error(actual, expected) < RTOL


def test_qk_norm_variance_ignores_the_dummy_channels():
    attn = build_tiny_model(seed=5).vision_model.encoder.layers[0].attn
    x = torch.randn(1, 3, attn.padded_dim)
    loud_dummies = x.clone()
    loud_dummies[..., attn.embed_dim :] *= 1000
    with torch.no_grad():
        torch.testing.assert_close(
            attn.q_norm(x)[..., : attn.embed_dim], attn.q_norm(loud_dummies)[..., : attn.embed_dim]
        )


def test_eager_and_sdpa_give_the_same_logits():
    model = build_tiny_model(seed=7)
    pixel_values = torch.randn(1, 3, 448, 448)
    input_ids = torch.tensor([[151644, 872, 198] + [IMAGE_TOKEN] * 256 + [9707]])
    with torch.no_grad():
        model.config._attn_implementation = "eager"
        eager = model(pixel_values=pixel_values, input_ids=input_ids).logits
        model.config._attn_implementation = "sdpa"
        sdpa = model(pixel_values=pixel_values, input_ids=input_ids).logits
    assert relative_error(sdpa, eager) < RTOL


def shuffled_cell(grid: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """Output cell (row, col) of the 0.5 pixel shuffle: the 2x2 input block it covers, concatenated in the order
    top-left, top-right, bottom-left, bottom-right."""
    r, c = 2 * row, 2 * col
    return torch.cat([grid[r, c], grid[r, c + 1], grid[r + 1, c], grid[r + 1, c + 1]])


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
def test_pixel_shuffle_follows_the_formula(ps_version):
    model = build_tiny_model(ps_version=ps_version)
    x = torch.randn(2, 32, 32, 5)
    out = model.pixel_shuffle(x, scale_factor=0.5)
    assert tuple(out.shape) == (2, 16, 16, 20)
    for tile in range(2):
        for row, col in [(0, 0), (0, 1), (3, 7), (15, 2), (15, 15)]:
            # v2 keeps the grid row-major; v1 leaves it transposed
            cell = out[tile, row, col] if ps_version == "v2" else out[tile, col, row]
            torch.testing.assert_close(cell, shuffled_cell(x[tile], row, col), rtol=0, atol=0)


def test_skipping_silent_dummy_heads_matches_computing_them(models, pixel_values, monkeypatch):
    ours, _ = models
    with torch.no_grad():
        skipped = ours.extract_feature(pixel_values)
        compute_every_head(ours, monkeypatch)
        computed = ours.extract_feature(pixel_values)
    assert relative_error(skipped, computed) < 1e-6
