"""NVLM-D-72B for Hugging Face transformers: the model, image loading, prompts, multi-GPU planning and a CLI.

Importing the package also registers NVLM-D with transformers' Auto classes, so that a model directory loads
with the installed code (`AutoModel.from_pretrained(path)`); with `trust_remote_code=True` the directory's own
modules are used instead, as on the Hub.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_nvlm_d import InternVisionConfig, NVLM_D_Config
from .conversation import build_prompt, get_conv_template
from .device_map import plan_device_map, smallest_gpu_count, split_model
from .image_processing_nvlm_d import build_transform, dynamic_preprocess, load_image, load_images
from .modeling_intern_vit import InternVisionModel
from .modeling_nvlm_d import NVLM_D_Model
from .quantization import bitsandbytes_config

__version__ = "0.1.0"

AutoConfig.register(NVLM_D_Config.model_type, NVLM_D_Config, exist_ok=True)
AutoConfig.register(InternVisionConfig.model_type, InternVisionConfig, exist_ok=True)
AutoModel.register(NVLM_D_Config, NVLM_D_Model, exist_ok=True)
AutoModelForCausalLM.register(NVLM_D_Config, NVLM_D_Model, exist_ok=True)
AutoModel.register(InternVisionConfig, InternVisionModel, exist_ok=True)

__all__ = [
    "InternVisionConfig",
    "InternVisionModel",
    "NVLM_D_Config",
    "NVLM_D_Model",
    "bitsandbytes_config",
    "build_prompt",
    "build_transform",
    "dynamic_preprocess",
    "get_conv_template",
    "load_image",
    "load_images",
    "plan_device_map",
    "smallest_gpu_count",
    "split_model",
]
