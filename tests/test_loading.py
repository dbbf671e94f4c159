"""Where the commands load NVLM-D (nvlm_d.loading): the placement is decided, and refused with a clear error, before
any weight is read."""

from __future__ import annotations

import json

import pytest
import torch

from nvlm_d.cli import main
from nvlm_d.loading import SPLIT, resolve_placement

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_the_cpu_loads_in_float32_without_a_device_map():
    placement = resolve_placement(device="cpu")
    assert (placement.device_map, placement.device, placement.dtype) == (None, "cpu", torch.float32)
    assert placement.description == "cpu, fp32"


def test_a_dtype_asked_for_is_kept_on_the_cpu():
    assert resolve_placement(device="cpu", dtype="bf16").dtype == torch.bfloat16


@no_cuda
def test_without_cuda_the_default_device_is_the_cpu():
    assert resolve_placement().device == "cpu"


@no_cuda
def test_gpus_without_cuda_are_refused_with_the_cpu_as_advice():
    with pytest.raises(ValueError, match="--gpus 2: no CUDA device is available here; use --device cpu"):
        resolve_placement(gpus=2)


@no_cuda
def test_a_cuda_device_without_cuda_is_refused():
    with pytest.raises(ValueError, match="--device cuda:1: no CUDA device"):
        resolve_placement(device="cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpus_take_the_model_cards_split_with_inputs_on_gpu_0():
    placement = resolve_placement(gpus=1)
    assert (placement.device_map, placement.device, placement.dtype) == (SPLIT, "cuda:0", torch.bfloat16)


def test_a_device_torch_does_not_know_is_refused_by_name():
    with pytest.raises(ValueError, match="--device gpu0: not a device"):
        resolve_placement(device="gpu0")


def test_gpus_and_a_device_together_are_refused():
    with pytest.raises(ValueError, match="exclude each other"):
        resolve_placement(gpus=1, device="cpu")


def test_an_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="'int4'"):
        resolve_placement(device="cpu", dtype="int4")


def test_a_directory_without_weights_is_a_one_line_load_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "NVLM_D"}))
    code = main(["chat", "--model", str(tmp_path), "--device", "cpu", "hello"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"nvlm-d: error: cannot load the model from {tmp_path}: ")


def test_a_replica_takes_the_model_cards_split_over_its_own_gpus(tiny_checkpoint, monkeypatch):
    """Data-parallel evaluation on 8 GPUs with 4 per replica: replica 1 loads onto GPUs 4-7 (the card's split,
    shifted), quantized as asked; nothing is placed on replica 0's GPUs."""
    import transformers

    from nvlm_d.device_map import split_model
    from nvlm_d.loading import Placement, load_model
    from nvlm_d.model_source import ModelSource

    asked = {}

    class Loaded:
        def eval(self):
            return self

    monkeypatch.setattr(
        transformers.AutoModel, "from_pretrained", lambda path, **kwargs: asked.update(kwargs) or Loaded()
    )
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path, **kwargs: None)
    placement = Placement(SPLIT, "cuda:4", torch.bfloat16, "4 GPU(s), bf16")
    load_model(ModelSource(str(tiny_checkpoint)), placement, gpus=4, first_gpu=4, bits=4)
    layers = json.loads((tiny_checkpoint / "config.json").read_text())["llm_config"]["num_hidden_layers"]
    card_split = split_model(4, num_layers=layers)
    assert asked["device_map"] == {name: gpu + 4 for name, gpu in card_split.items()}
    assert set(asked["device_map"].values()) <= {4, 5, 6, 7}
    assert asked["quantization_config"].load_in_4bit
