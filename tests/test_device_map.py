"""split_model, the weight-free planner, offloading and quantized loading."""

from __future__ import annotations

import re
import warnings

import model_card_code
import pytest
import torch
from accelerate.utils import check_device_map, convert_file_size_to_int
from transformers import AutoModel

from nvlm_d.device_map import (
    build_meta_model,
    format_plan,
    kv_cache_bytes_per_layer,
    parse_memory,
    plan_device_map,
    smallest_gpu_count,
    split_model,
)
from nvlm_d.quantization import bitsandbytes_config

GREEDY = {"max_new_tokens": 8, "do_sample": False}


def card_split_model(world_size: int, monkeypatch) -> dict[str, int]:
    """The model card's split_model, run with torch.cuda.device_count() patched to `world_size`."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: world_size)
    return model_card_code.split_model()


def decoder_layers(device_map: dict) -> dict[int, int]:
    return {
        int(m.group(1)): device
        for name, device in device_map.items()
        if (m := re.fullmatch(r"language_model\.model\.layers\.(\d+)", name)) and int(m.group(1)) < 80
    }


@pytest.fixture(scope="module")
def meta_72b():
    return build_meta_model()


@pytest.mark.parametrize("num_gpus", range(1, 9))
def test_split_model_covers_every_tensor_and_buffer_of_the_72b_model(meta_72b, num_gpus):
    device_map = split_model(num_gpus)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # accelerate warns about keys that name no module
        check_device_map(meta_72b, device_map)
    modules = dict(meta_72b.named_modules())
    assert all(name in modules for name in device_map)
    for name, _ in meta_72b.named_buffers():  # non-persistent buffers too (the rotary embedding's)
        assert any(name.startswith(prefix + ".") for prefix in device_map), name
    assert set(device_map.values()) <= set(range(num_gpus))


@pytest.mark.parametrize("num_gpus", range(2, 9))
def test_split_model_places_decoder_layers_as_the_model_card_does(num_gpus, monkeypatch):
    assert decoder_layers(split_model(num_gpus)) == decoder_layers(card_split_model(num_gpus, monkeypatch))


def test_split_model_keeps_the_decoder_ends_on_gpu_0():
    device_map = split_model(4)
    for name in (
        "vision_model",
        "mlp1",
        "language_model.model.embed_tokens",
        "language_model.model.norm",
        "language_model.lm_head",
        "language_model.model.rotary_emb",
        "language_model.model.layers.79",
    ):
        assert device_map[name] == 0, name


def test_split_model_without_gpus_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="no CUDA device"):
        split_model()


@pytest.mark.parametrize("num_gpus", [0, -1, 1.5, True])
def test_split_model_rejects_a_bad_gpu_count(num_gpus):
    with pytest.raises(ValueError, match="num_gpus"):
        split_model(num_gpus)


def test_kv_cache_of_qwen2_72b_is_320_kib_per_token(meta_72b):
    per_layer = kv_cache_bytes_per_layer(meta_72b.config.llm_config, context=1, batch=1)
    assert per_layer == 2 * 8 * 128 * 2  # K and V, 8 KV heads of 128, bf16
    assert per_layer * 80 == 320 * 1024


def test_plan_places_every_tensor_on_the_gpus_it_fits(meta_72b):
    plan = plan_device_map(3, gpu_memory="80GB", dtype="bf16", context=8192, model=meta_72b)
    assert plan.fits
    check_device_map(meta_72b, plan.device_map)
    assert sum(len(gpu.decoder_layers) for gpu in plan.gpus) == 80
    tensors = [*meta_72b.parameters(), *meta_72b.buffers()]
    assert sum(gpu.weight_bytes for gpu in plan.gpus) == 2 * sum(t.numel() for t in tensors)  # all in bf16
    assert "vision_model" in plan.gpus[0].other_modules
    assert all(gpu.free_bytes >= 0 for gpu in plan.gpus)


def test_plan_reserves_the_kv_cache_of_the_layers_each_gpu_holds(meta_72b):
    plan = plan_device_map(3, gpu_memory="80GB", context=8192, batch=2, model=meta_72b)
    for gpu in plan.gpus:
        assert gpu.kv_cache_bytes == len(gpu.decoder_layers) * 2 * 8 * 128 * 8192 * 2 * 2


@pytest.mark.parametrize(
    "gpu_memory, dtype, expected_gpus",
    [("80GB", "bf16", 3), ("80GB", "int8", 2), ("80GB", "int4", 1), ("141GB", "bf16", 2), ("141GB", "int8", 1)],
)
def test_smallest_gpu_count_for_an_8k_context(meta_72b, gpu_memory, dtype, expected_gpus):
    # 147.9 GiB of bf16 weights; int8 quantizes the decoder's linear layers only (82.5 GiB in all)
    plan = smallest_gpu_count(gpu_memory=gpu_memory, dtype=dtype, context=8192, model=meta_72b)
    assert len(plan.gpus) == expected_gpus


def test_a_balanced_plan_spreads_the_decoder_layers_over_every_gpu_given(meta_72b):
    plan = plan_device_map(8, gpu_memory="80GB", model=meta_72b)
    assert plan.fits and plan.strategy == "balanced"
    check_device_map(meta_72b, plan.device_map)
    counts = [len(gpu.decoder_layers) for gpu in plan.gpus]
    assert all(counts) and sum(counts) == 80
    layers = [layer for gpu in plan.gpus for layer in gpu.decoder_layers]
    assert layers == list(range(80))  # in order: each GPU a contiguous range
    used = [gpu.capacity_bytes - gpu.free_bytes for gpu in plan.gpus]
    layer_bytes = 2 * sum(p.numel() for p in meta_72b.language_model.model.layers[0].parameters())
    assert max(used) - min(used) <= layer_bytes + plan.gpus[0].kv_cache_bytes / counts[0]  # within one layer
    for module in ("vision_model", "mlp1", "language_model.model.embed_tokens"):
        assert plan.device_map[module] == 0
    assert plan.device_map["language_model.lm_head"] == 7


def test_a_sequential_plan_fills_the_gpus_in_order(meta_72b):
    plan = plan_device_map(8, gpu_memory="80GB", model=meta_72b, strategy="sequential")
    assert plan.fits
    assert [len(gpu.decoder_layers) > 0 for gpu in plan.gpus] == [True] * 3 + [False] * 5


@pytest.mark.parametrize("gpu_memory, dtype", [("80GB", "bf16"), ("141GB", "bf16"), ("80GB", "int4")])
def test_the_balanced_plan_needs_no_more_gpus_than_the_sequential_one(meta_72b, gpu_memory, dtype):
    counts = {
        strategy: len(smallest_gpu_count(gpu_memory=gpu_memory, dtype=dtype, model=meta_72b, strategy=strategy).gpus)
        for strategy in ("balanced", "sequential")
    }
    assert counts["balanced"] <= counts["sequential"]


def test_a_plan_that_does_not_fit_says_so(meta_72b):
    plan = plan_device_map(1, gpu_memory="80GB", dtype="bf16", model=meta_72b)
    assert not plan.fits
    assert "does not fit" in format_plan(plan)


def test_quantized_plans_keep_the_vision_tower_in_bf16(meta_72b):
    int4 = plan_device_map(1, gpu_memory="80GB", dtype="int4", model=meta_72b)
    vision_bytes = 2 * sum(p.numel() for p in meta_72b.vision_model.parameters())
    assert int4.gpus[0].weight_bytes > vision_bytes + 0.5 * 70e9


@pytest.mark.parametrize("size", ["0GB", "-80GiB", "eighty", "", "80 parsecs", None, True])
def test_unparsable_or_non_positive_memory_is_rejected(size):
    with pytest.raises(ValueError, match="memory must be a positive size"):
        parse_memory(size)


@pytest.mark.parametrize("size", ["80GB", "80GiB", "141GB", "24GiB", "512MiB", "1.5GB", "0.5GiB", "300KB", 10**9])
def test_memory_sizes_are_counted_as_accelerate_counts_them(size):
    assert parse_memory(size) == convert_file_size_to_int(size)


def test_memory_units_ignore_case_and_a_bare_number_is_bytes():
    assert parse_memory("80gib") == parse_memory("80GiB") == 80 << 30
    assert parse_memory("1TB") == 10**12 and parse_memory("2048") == 2048


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_gpus": 0}, "num_gpus"),
        ({"num_gpus": 2, "dtype": "int3"}, "dtype"),
        ({"num_gpus": 2, "context": 0}, "context"),
        ({"num_gpus": 2, "strategy": "diagonal"}, "strategy"),
    ],
)
def test_plan_rejects_bad_arguments(meta_72b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_device_map(model=meta_72b, **kwargs)


# -- loading with a device map ---------------------------------------------------------------------------------


def test_chat_works_with_layers_offloaded_to_cpu_and_disk(tiny_checkpoint, tiny_model, tokenizer, tmp_path):
    device_map = {
        "vision_model": "cpu",
        "mlp1": "disk",
        "language_model.model.embed_tokens": "cpu",
        "language_model.model.rotary_emb": "cpu",
        "language_model.model.layers.0": "disk",
        "language_model.model.layers.1": "cpu",
        "language_model.model.norm": "cpu",
        "language_model.lm_head": "disk",
    }
    offloaded = AutoModel.from_pretrained(
        tiny_checkpoint, trust_remote_code=True, dtype=torch.float32, device_map=device_map, offload_folder=tmp_path
    ).eval()
    # disk-offloaded weights stay in the checkpoint files until a hook loads them for their forward
    assert offloaded.language_model.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    assert offloaded.mlp1[1].weight.device.type == "meta"
    pixel_values = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    expected = tiny_model.chat(tokenizer, pixel_values, "Describe.", GREEDY)
    assert offloaded.chat(tokenizer, pixel_values, "Describe.", GREEDY) == expected


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_loading_keeps_the_vision_tower_and_projector_in_bf16(tiny_checkpoint, tokenizer, bits):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = AutoModel.from_pretrained(
        tiny_checkpoint,
        trust_remote_code=True,
        dtype=torch.bfloat16,
        device_map="cpu" if not torch.cuda.is_available() else 0,
        quantization_config=bitsandbytes_config(bits),
    ).eval()
    quantized = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert isinstance(model.language_model.model.layers[0].mlp.up_proj, quantized)
    assert isinstance(model.language_model.model.layers[0].self_attn.q_proj, quantized)
    for module in (model.vision_model, model.mlp1, model.language_model.lm_head):
        assert not any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in module.modules())
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    answer = model.chat(tokenizer, torch.randn(1, 3, 448, 448), "Describe.", GREEDY)
    assert isinstance(answer, str)


def test_bitsandbytes_config_rejects_other_bit_widths():
    with pytest.raises(ValueError, match="8 or 4"):
        bitsandbytes_config(2)
