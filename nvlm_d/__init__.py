"""NVLM-D-72B for Hugging Face transformers: the model, image loading, prompts, multi-GPU planning and a CLI.

`import nvlm_d` is cheap: it imports neither torch nor transformers. Each public name is imported from its module
the first time it is used (`nvlm_d.NVLM_D_Model`, `from nvlm_d import load_image`).

Importing the package also registers NVLM-D with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForCausalLM, AutoModelForImageTextToText, AutoImageProcessor, AutoProcessor), as soon as transformers
loads them (see `nvlm_d.auto_registration`), and makes `AutoTokenizer` give the tokenizer of NVIDIA's released
snapshot NVLM's chat template instead of the Qwen2.5 one its files hold (see `nvlm_d.tokenizer_template`). What
`AutoModel.from_pretrained(path)` then builds for an NVLM-D model directory:

* after `import nvlm_d`: the installed classes (`nvlm_d.NVLM_D_Model`), without `trust_remote_code`, and also
  with `trust_remote_code=True`: transformers prefers classes registered by a package over a directory's
  `auto_map`;
* without `import nvlm_d` (installed or not): the directory's own modules, with `trust_remote_code=True`.
  Without it, transformers asks whether to run the directory's code (in an interactive session) or raises a
  ValueError asking for `trust_remote_code=True`.
"""

import importlib

from . import auto_registration

__version__ = "0.1.0"

# Public name -> the module that defines it, imported on first use. A new public name is one line here.
_EXPORTS = {
    "InternVisionConfig": "configuration_nvlm_d",
    "NVLM_D_Config": "configuration_nvlm_d",
    "build_prompt": "conversation",
    "get_conv_template": "conversation",
    "plan_device_map": "device_map",
    "smallest_gpu_count": "device_map",
    "split_model": "device_map",
    "build_transform": "image_processing_nvlm_d",
    "dynamic_preprocess": "image_processing_nvlm_d",
    "load_image": "image_processing_nvlm_d",
    "load_images": "image_processing_nvlm_d",
    "NVLM_D_ImageProcessor": "image_processing_nvlm_d",
    "NVLM_D_Processor": "processing_nvlm_d",
    "ChatSession": "chat_nvlm_d",
    "InternVisionModel": "modeling_intern_vit",
    "NVLM_D_Model": "modeling_nvlm_d",
    "bitsandbytes_config": "quantization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


auto_registration.install()
