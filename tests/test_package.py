"""`import nvlm_d`: cheap (no torch, no transformers), names imported on first use, and NVLM-D registered with
transformers' Auto classes whenever transformers loads them.

Each check runs in a fresh interpreter: this test process imported torch and transformers long ago."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import nvlm_d

OUTER_LIMIT_S = 1800  # only a hung interpreter gets near it


def run_python(code: str, *args: str) -> str:
    """Run `code` in a fresh interpreter; its stdout, or the test fails with its stderr."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdin=subprocess.DEVNULL,  # no one to answer a prompt
            capture_output=True,
            text=True,
            timeout=OUTER_LIMIT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the interpreter still ran after {OUTER_LIMIT_S} s; stderr so far:\n{exc.stderr}")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_nvlm_d_imports_neither_torch_nor_transformers():
    loaded = run_python(
        """
        import sys
        import nvlm_d
        print(sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers", "accelerate", "PIL"}))
        """
    )
    assert loaded.strip() == "[]"


def test_every_public_name_is_the_one_its_module_defines():
    import importlib

    for name in nvlm_d.__all__:
        module = importlib.import_module(f"nvlm_d.{nvlm_d._EXPORTS[name]}")
        assert getattr(nvlm_d, name) is getattr(module, name), name
    assert set(nvlm_d.__all__) <= set(dir(nvlm_d))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NVLM_E_Model'"):
        nvlm_d.NVLM_E_Model  # noqa: B018


REGISTERED = """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    import nvlm_d

    assert CONFIG_MAPPING["NVLM_D"] is nvlm_d.NVLM_D_Config
    assert CONFIG_MAPPING["intern_vit_6b"] is nvlm_d.InternVisionConfig
    assert AutoModel._model_mapping[nvlm_d.NVLM_D_Config] is nvlm_d.NVLM_D_Model
    assert AutoModelForCausalLM._model_mapping[nvlm_d.NVLM_D_Config] is nvlm_d.NVLM_D_Model
    assert AutoModel._model_mapping[nvlm_d.InternVisionConfig] is nvlm_d.InternVisionModel
    assert AutoModelForImageTextToText._model_mapping[nvlm_d.NVLM_D_Config] is nvlm_d.NVLM_D_Model
    assert PROCESSOR_MAPPING[nvlm_d.NVLM_D_Config] is nvlm_d.NVLM_D_Processor
    assert IMAGE_PROCESSOR_MAPPING[nvlm_d.NVLM_D_Config]["pil"] is nvlm_d.NVLM_D_ImageProcessor
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained._nvlm_d_template  # gives the released snapshot NVLM's chat template
    print("registered")
"""


@pytest.mark.parametrize(
    "first",
    [
        "import nvlm_d",
        "import nvlm_d; from transformers import AutoConfig",
        "import nvlm_d; from transformers import Qwen2ForCausalLM",  # loads AutoModel halfway through its own import
        "from nvlm_d.modeling_nvlm_d import NVLM_D_Model",  # the same, inside nvlm_d's own modeling module
        "from transformers import AutoModel; import nvlm_d",
    ],
)
def test_nvlm_d_is_registered_with_the_auto_classes_whatever_is_imported_first(first):
    assert run_python(first + "\n" + textwrap.dedent(REGISTERED)).strip() == "registered"


def test_after_import_nvlm_d_a_model_directory_loads_the_installed_classes(tiny_checkpoint):
    """Without trust_remote_code, and with it: transformers prefers the classes a package registered."""
    classes = run_python(
        """
        import sys
        import nvlm_d
        from transformers import AutoModel, AutoProcessor

        plain = AutoModel.from_pretrained(sys.argv[1])
        trusted = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(sys.argv[1])
        print(type(plain) is nvlm_d.NVLM_D_Model, type(trusted) is nvlm_d.NVLM_D_Model)
        image_processor = processor.image_processor
        print(type(processor) is nvlm_d.NVLM_D_Processor, type(image_processor) is nvlm_d.NVLM_D_ImageProcessor)
        """,
        str(tiny_checkpoint),
    )
    assert classes.split() == ["True", "True", "True", "True"]


def test_without_import_nvlm_d_transformers_asks_for_trust_remote_code(tiny_checkpoint):
    """It prompts ("Do you wish to run the custom code?"); with no answer (stdin closed), it raises."""
    outcome = run_python(
        """
        import sys
        from transformers import AutoModel

        try:
            AutoModel.from_pretrained(sys.argv[1])
        except ValueError as exc:
            print("trust_remote_code=True" in str(exc))
        print(type(AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)).__module__.split(".")[0])
        """,
        str(tiny_checkpoint),
    )
    assert "Do you wish to run the custom code?" in outcome
    assert outcome.split()[-2:] == ["True", "transformers_modules"]
