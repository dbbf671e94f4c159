"""Fast paths give the answers of the plain path: static cache, torch.compile, and chunked vision encoding."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, CompileConfig

GREEDY = {"max_new_tokens": 10, "do_sample": False}


def tiles(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


def test_static_cache_gives_the_greedy_tokens_of_the_dynamic_cache(tiny_model, tokenizer):
    pixel_values = tiles(2)
    dynamic = tiny_model.chat(tokenizer, pixel_values, "Describe.", GREEDY)
    static = tiny_model.chat(tokenizer, pixel_values, "Describe.", {**GREEDY, "cache_implementation": "static"})
    assert static == dynamic


def test_static_cache_works_for_left_padded_batches(tiny_model, tokenizer):
    questions, pixel_values = ["Describe.", "Hello there, how are you today?"], tiles(2)
    dynamic = tiny_model.batch_chat(tokenizer, pixel_values, questions, GREEDY, num_patches_list=[2, 0])
    static = tiny_model.batch_chat(
        tokenizer, pixel_values, questions, {**GREEDY, "cache_implementation": "static"}, num_patches_list=[2, 0]
    )
    assert static == dynamic


def test_compiled_decoding_gives_the_greedy_tokens_of_eager_decoding(tiny_model, tokenizer):
    compile_config = CompileConfig(backend="inductor", mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told (as its tests do)
    pixel_values = tiles(1, seed=3)
    eager = tiny_model.chat(tokenizer, pixel_values, "Describe.", GREEDY)
    compiled = tiny_model.chat(
        tokenizer,
        pixel_values,
        "Describe.",
        {**GREEDY, "cache_implementation": "static", "compile_config": compile_config},
    )
    assert compiled == eager


def test_vision_batch_size_encodes_tiles_in_chunks_with_the_same_features(tiny_checkpoint):
    whole = AutoModel.from_pretrained(tiny_checkpoint, trust_remote_code=True, dtype=torch.float32)
    chunked = AutoModel.from_pretrained(
        tiny_checkpoint, trust_remote_code=True, dtype=torch.float32, vision_batch_size=2
    )
    batch_sizes = []
    chunked.vision_model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    pixel_values = tiles(5, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(chunked.extract_feature(pixel_values), whole.extract_feature(pixel_values))
    assert batch_sizes == [2, 2, 1]


@pytest.mark.parametrize("size", [0, -1, 1.5])
def test_vision_batch_size_must_be_positive(tiny_checkpoint, size):
    with pytest.raises(ValueError, match="vision_batch_size"):
        AutoModel.from_pretrained(tiny_checkpoint, trust_remote_code=True, vision_batch_size=size)
