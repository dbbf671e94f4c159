"""resolve_model: what `--model` (and a script) may name, checked before anything is loaded."""

from __future__ import annotations

import pytest

from nvlm_d.model_source import ModelSource, resolve_model


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
