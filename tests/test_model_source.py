"""resolve_model: what `--model` (and a script) may name, checked before anything is loaded; read_config: its
config, for planning without weights."""

from __future__ import annotations

import json

import pytest

from nvlm_d.model_source import ModelSource, read_config, resolve_model


def test_a_directory_with_a_config_is_a_local_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == ModelSource(str(tmp_path))


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda path: path.mkdir(), "not a model directory (no config.json in it)"),
        (lambda path: path.write_text("x"), "is a file; expected a model directory"),
        (lambda path: None, "no such directory, and not a Hub id (owner/name)"),
    ],
    ids=["directory without config", "file", "missing"],
)
def test_what_is_not_a_model_is_a_value_error_naming_it(tmp_path, make, words):
    path = tmp_path / "model"
    make(path)
    with pytest.raises(ValueError, match=f"^{path}: .*") as raised:
        resolve_model(str(path))
    assert words in str(raised.value)


def test_a_hub_id_is_taken_unchecked_without_contacting_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("nvidia/NVLM-D-72B", contact_hub=False) == ModelSource("nvidia/NVLM-D-72B")


def test_read_config_gives_the_directorys_nvlm_d_config(tiny_checkpoint):
    written = json.loads((tiny_checkpoint / "config.json").read_text())
    config = read_config(resolve_model(str(tiny_checkpoint)))
    assert config.model_type == "NVLM_D"
    assert config.llm_config.num_hidden_layers == written["llm_config"]["num_hidden_layers"]


def test_read_config_refuses_another_model_naming_its_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match=f"^{tmp_path} is not an NVLM-D model \\(model_type 'qwen2'\\)$"):
        read_config(resolve_model(str(tmp_path)))


def test_an_unreadable_config_is_a_value_error_naming_the_model(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"^cannot read the config of {tmp_path}: "):
        read_config(resolve_model(str(tmp_path)))
