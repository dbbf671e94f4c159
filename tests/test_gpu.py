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


@pytest.fixture(scope="module")
def cuda_fp32_model(tiny_checkpoint):
    return AutoModel.from_pretrained(tiny_checkpoint, trust_remote_code=True, dtype=torch.float32, device_map="cuda:0")


def test_processor_inputs_on_cuda_answer_as_chat_does(tiny_checkpoint, cuda_bf16_model, tokenizer, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    from nvlm_d.image_processing_nvlm_d import load_image

    Image.effect_mandelbrot((900, 500), (-2.0, -1.2, 1.0, 1.2), 100).convert("RGB").save(tmp_path / "image.png")
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": str(tmp_path / "image.png")}, {"type": "text", "text": "Describe."}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to("cuda:0")
    answer = processor.batch_decode(cuda_bf16_model.generate(**inputs, **GREEDY), skip_special_tokens=True)[0]
    pixel_values = load_image(tmp_path / "image.png", max_num=6)
    assert answer.strip() == cuda_bf16_model.chat(tokenizer, pixel_values, "Describe.", GREEDY)


@pytest.mark.parametrize("offloaded", ["vision_model", "mlp1", "language_model.model.embed_tokens"])
def test_cpu_offloaded_modules_run_on_the_gpu_and_answer_as_the_gpu_model(
    tiny_checkpoint, cuda_fp32_model, tokenizer, offloaded
):
    modules = ["vision_model", "mlp1", "language_model.model.embed_tokens", "language_model.model.rotary_emb"]
    modules += ["language_model.model.layers", "language_model.model.norm", "language_model.lm_head"]
    device_map = {name: "cpu" if name == offloaded else 0 for name in modules}
    placed = AutoModel.from_pretrained(
        tiny_checkpoint, trust_remote_code=True, dtype=torch.float32, device_map=device_map
    ).eval()
    pixel_values = tiles(2, seed=5)
    expected = cuda_fp32_model.chat(tokenizer, pixel_values, "Describe.", GREEDY)
    assert placed.chat(tokenizer, pixel_values, "Describe.", GREEDY) == expected


def test_a_chat_session_on_cuda_answers_as_chat_with_history(cuda_fp32_model, tokenizer):
    pixel_values = tiles(3, seed=6)
    session = cuda_fp32_model.start_chat(tokenizer, GREEDY)
    history, pairs = None, []
    for number, question in enumerate(["What is it?", "What colour is it?", "Is it large?"]):
        answer, history = cuda_fp32_model.chat(
            tokenizer, pixel_values, question, GREEDY, history=history, return_history=True
        )
        pairs.append((session.ask(question, pixel_values if number == 0 else None), answer))
    assert [mine for mine, _ in pairs] == [theirs for _, theirs in pairs]


def test_compiled_static_cache_decoding_on_cuda_gives_the_eager_tokens(cuda_fp32_model, tokenizer):
    pixel_values = tiles(1, seed=7)
    eager = cuda_fp32_model.chat(tokenizer, pixel_values, "Describe.", GREEDY)
    compiled = cuda_fp32_model.chat(tokenizer, pixel_values, "Describe.", {**GREEDY, "cache_implementation": "static"})
    assert compiled == eager
