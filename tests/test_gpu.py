"""On a CUDA device: bf16 inference, device maps over GPU and CPU, and the attention kernels agree.

Skipped without CUDA (see conftest.py); run them on a GPU machine with `python -m pytest -m gpu`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel
from transformers.utils import is_flash_attn_2_available

pytestmark = pytest.mark.gpu

GREEDY = {"max_new_tokens": 12, "do_sample": False}


def tiles(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(scope="module")
def cuda_bf16_model(tiny_checkpoint):
    return AutoModel.from_pretrained(
        tiny_checkpoint,
        torch_dtype=torch.bfloat16,
        low_cpu_mem_usage=True,
        use_flash_attn=False,
        trust_remote_code=True,
        device_map="cuda:0",
    ).eval()


def test_bf16_chat_on_cuda_takes_float32_pixel_values_from_the_cpu(cuda_bf16_model, tokenizer):
    answer, history = cuda_bf16_model.chat(tokenizer, tiles(3), "Describe.", GREEDY, return_history=True)
    assert isinstance(answer, str) and history[-1][1] == answer


def test_bf16_greedy_chat_is_the_same_with_and_without_the_kv_cache(cuda_bf16_model, tokenizer):
    pixel_values = tiles(2, seed=1).to(torch.bfloat16)
    cached = cuda_bf16_model.chat(tokenizer, pixel_values, "Describe.", GREEDY)
    uncached = cuda_bf16_model.chat(tokenizer, pixel_values, "Describe.", {**GREEDY, "use_cache": False})
    assert cached == uncached


def test_bf16_batch_chat_runs_on_cuda(cuda_bf16_model, tokenizer):
    answers = cuda_bf16_model.batch_chat(
        tokenizer, tiles(3), ["Describe.", "Hello, who are you?"], GREEDY, num_patches_list=[3, 0]
    )
    assert len(answers) == 2


def test_model_split_between_cuda_and_cpu_answers_like_the_cpu_model(tiny_checkpoint, tiny_model, tokenizer):
    device_map = {
        "vision_model": 0,
        "mlp1": 0,
        "language_model.model.embed_tokens": 0,
        "language_model.model.rotary_emb": 0,
        "language_model.model.layers.0": 0,
        "language_model.model.layers.1": "cpu",
        "language_model.model.norm": "cpu",
        "language_model.lm_head": 0,
    }
    split = AutoModel.from_pretrained(
        tiny_checkpoint, trust_remote_code=True, dtype=torch.float32, device_map=device_map
    ).eval()
    pixel_values = tiles(2, seed=2)
    with torch.no_grad():
        ids = torch.tensor([[151644, 872, 198] + [151654] * 512 + [9707]])
        expected = tiny_model(pixel_values=pixel_values, input_ids=ids).logits
        actual = split(pixel_values=pixel_values, input_ids=ids).logits
    assert relative_error(actual.cpu(), expected) < 1e-3  # TF32/cuBLAS vs CPU kernels


def test_eager_and_sdpa_vision_features_agree_in_bf16(cuda_bf16_model):
    pixel_values = tiles(2, seed=3)
    with torch.no_grad():
        cuda_bf16_model.config._attn_implementation = "eager"
        eager = cuda_bf16_model.extract_feature(pixel_values)
        cuda_bf16_model.config._attn_implementation = "sdpa"
        sdpa = cuda_bf16_model.extract_feature(pixel_values)
    assert relative_error(sdpa, eager) < 2e-2


@pytest.mark.skipif(not is_flash_attn_2_available(), reason="flash-attn is not installed")
def test_flash_attention_matches_sdpa(tiny_checkpoint):
    load = lambda attn: AutoModel.from_pretrained(  # noqa: E731
        tiny_checkpoint, dtype=torch.bfloat16, trust_remote_code=True, device_map="cuda:0", attn_implementation=attn
    ).eval()
    flash, sdpa = load("flash_attention_2"), load("sdpa")
    assert flash.vision_model.config._attn_implementation == "flash_attention_2"
    pixel_values = tiles(2, seed=4)
    with torch.no_grad():
        assert relative_error(flash.extract_feature(pixel_values), sdpa.extract_feature(pixel_values)) < 2e-2
