"""The released config.json loads unchanged, round-trips, and the repository's own config.json describes the same
model."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoProcessor, Qwen2Config

from nvlm_d.configuration_nvlm_d import InternVisionConfig, NVLM_D_Config

PACKAGE_MODULES = ("configuration_nvlm_d.py",)


@pytest.fixture(scope="module")
def released_config_dir(reference_dir, repo_root, tmp_path_factory):
    """A model directory holding the checkpoint's config.json as it is, and our remote code."""
    directory = tmp_path_factory.mktemp("released_config")
    shutil.copyfile(reference_dir / "nvlm_d_72b_config.json", directory / "config.json")
    for name in PACKAGE_MODULES:
        shutil.copyfile(repo_root / "nvlm_d" / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def released_config(released_config_dir):
    return AutoConfig.from_pretrained(released_config_dir, trust_remote_code=True)


def _fields(config) -> dict:
    """The values of the fields a config class declares (what shapes the model), without bookkeeping."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in ("transformers_version", "vision_config", "llm_config")
    }


def test_released_config_loads_through_autoconfig(released_config):
    assert released_config.model_type == "NVLM_D"
    assert released_config.template == "chatml"
    assert released_config.ps_version == "v2"
    assert released_config.vision_config.model_type == "intern_vit_6b"
    assert released_config.vision_config.num_hidden_layers == 45
    assert isinstance(released_config.llm_config, Qwen2Config)
    assert released_config.llm_config.num_hidden_layers == 80
    assert released_config.num_image_token == 256


def test_legacy_llama_model_type_of_the_decoder_config_is_read_as_qwen2(released_config):
    assert released_config.llm_config.model_type == "qwen2"
    assert released_config.llm_config.architectures == ["Qwen2ForCausalLM"]


def test_legacy_rope_scaling_keys_become_rope_parameters(released_config):
    rope = released_config.llm_config.rope_parameters
    assert rope["rope_type"] == "dynamic"
    assert rope["factor"] == 3.0
    assert rope["rope_theta"] == 1000000.0


def test_released_config_round_trips_through_save_pretrained(released_config, tmp_path):
    released_config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    first, second = released_config.to_dict(), reloaded.to_dict()
    for config_dict in (first, second):
        config_dict.pop("_name_or_path")
    assert first == second
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == released_config.auto_map


def test_repository_config_describes_the_released_model(released_config, repo_root):
    ours = AutoConfig.from_pretrained(repo_root, trust_remote_code=True)
    assert _fields(ours) == _fields(released_config)
    assert _fields(ours.vision_config) == _fields(released_config.vision_config)
    assert _fields(ours.llm_config) == _fields(released_config.llm_config)
    assert released_config.auto_map.items() <= ours.auto_map.items()
    assert ours.auto_map["AutoModelForImageTextToText"] == "modeling_nvlm_d.NVLM_D_Model"


def test_repository_config_files_are_what_the_build_tool_writes(repo_root, tmp_path):
    subprocess.run(
        [sys.executable, str(repo_root / "tools" / "build_config.py"), "--output", str(tmp_path)], check=True
    )
    for name in ("config.json", "processor_config.json"):
        written = json.loads((tmp_path / name).read_text())
        committed = json.loads((repo_root / name).read_text())
        for config_dict in (written, committed):
            config_dict.pop("transformers_version", None)
        assert written == committed, name


def test_repository_root_loads_as_a_processor(repo_root):
    processor = AutoProcessor.from_pretrained(repo_root, trust_remote_code=True)
    assert type(processor).__name__ == "NVLM_D_Processor"
    assert processor.image_processor.max_dynamic_patch == 6
    assert processor.image_seq_length == 256


def test_default_config_is_nvlm_d_72b():
    config = NVLM_D_Config()
    assert (config.vision_config.hidden_size, config.vision_config.num_dummy_heads) == (3200, 7)
    assert (config.llm_config.hidden_size, config.llm_config.intermediate_size) == (8192, 29568)
    assert config.llm_config.tie_word_embeddings is False


def test_decoder_other_than_qwen2_is_rejected():
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        NVLM_D_Config(llm_config={"architectures": ["LlamaForCausalLM"]})


def test_unknown_pixel_shuffle_version_is_rejected():
    with pytest.raises(ValueError, match="ps_version"):
        NVLM_D_Config(ps_version="v3")


def test_tile_size_other_than_the_vision_tower_input_is_rejected():
    with pytest.raises(ValueError, match="force_image_size"):
        NVLM_D_Config(force_image_size=336)


def test_vision_norm_other_than_rms_norm_is_rejected():
    with pytest.raises(ValueError, match="rms_norm"):
        InternVisionConfig(norm_type="layer_norm")
