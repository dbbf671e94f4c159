"""Loading NVLM-D for inference: where the weights go (a `Placement`) and the model and tokenizer themselves.

The commands that run the model in this process (chat, batch, demo, web, eval's hf backend) and a script that wants
the same choices ask this module: one GPU, the model card's layer split over several (`split_model`), or the CPU,
with the dtype that suits each (bf16 on a GPU, fp32 on the CPU, where bf16 matmuls are slow). The placement is
decided and checked before the minutes-long load, so that an impossible one fails at once. Its parameters are the
commands' options (`--gpus`, `--device`, `--dtype`), and errors name them as the commands spell them. Importing this
module costs only the standard library; torch and transformers are imported when they are needed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .model_source import ModelSource

DTYPE_NAMES = ("bf16", "fp16", "fp32")
SPLIT = "split"  # Placement.device_map for the model card's layer split, computed from the config at load time


@dataclasses.dataclass
class Placement:
    """Where and in which dtype to load the model."""

    device_map: Any  # None (the CPU), {"": device}, or SPLIT (split_model's map over the GPUs)
    device: str  # where inputs go first ("cpu", "cuda:0", ...)
    dtype: Any  # torch dtype
    description: str  # for people: "cuda:0, bf16", "2 GPU(s), bf16"


def resolve_placement(gpus: int | None = None, device: str | None = None, dtype: str | None = None) -> Placement:
    """The placement for `gpus` GPUs (the model card's layer split) or one `device` (default: cuda if available,
    else cpu), in `dtype` (`bf16`, `fp16`, `fp32`; default bf16 on a GPU, fp32 on the CPU).

    Raises:
        ValueError: both `gpus` and `device`, an unknown dtype or device, or GPUs that are not here.
    """
    import torch

    if gpus is not None and device is not None:
        raise ValueError("--gpus and --device exclude each other: give one")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    cuda = torch.cuda.is_available()
    if gpus is not None:
        if not cuda:
            raise ValueError(f"--gpus {gpus}: no CUDA device is available here; use --device cpu")
        if gpus > torch.cuda.device_count():
            raise ValueError(f"--gpus {gpus}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return Placement(SPLIT, "cuda:0", dtypes[dtype or "bf16"], f"{gpus} GPU(s), {dtype or 'bf16'}")
    device = device or ("cuda" if cuda else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device}: not a device (try cpu, cuda or cuda:1)") from None
    if kind == "cuda" and not cuda:
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    dtype_name = dtype or ("fp32" if kind == "cpu" else "bf16")
    device_map = None if kind == "cpu" else {"": device}
    return Placement(device_map, device, dtypes[dtype_name], f"{device}, {dtype_name}")


def load_model(
    source: ModelSource,
    placement: Placement,
    gpus: int | None = None,
    first_gpu: int = 0,
    bits: int | None = None,
) -> tuple[Any, Any]:
    """`AutoModel.from_pretrained(source.path, trust_remote_code=True, ...)` in eval mode, placed as `placement`
    says (`gpus`: the GPU count of a SPLIT placement, over GPUs `first_gpu`.. so that data-parallel replicas each
    take their own group), with the decoder quantized to `bits` 8 or 4 (bitsandbytes) if given, and its tokenizer.

    Raises:
        whatever transformers raises when the model or tokenizer cannot be loaded (OSError, ValueError, ...).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    common: dict[str, Any] = {"trust_remote_code": True, "local_files_only": source.local_files_only}
    kwargs: dict[str, Any] = {**common, "dtype": placement.dtype}
    if placement.device_map == SPLIT:
        from .device_map import split_model

        config = AutoConfig.from_pretrained(source.path, **common)
        split = split_model(gpus, num_layers=config.llm_config.num_hidden_layers)
        kwargs["device_map"] = {name: first_gpu + gpu for name, gpu in split.items()}
    elif placement.device_map is not None:
        kwargs["device_map"] = placement.device_map
    if bits is not None:
        from .quantization import bitsandbytes_config

        kwargs["quantization_config"] = bitsandbytes_config(bits)
    if source.local_files_only:  # transformers 5.24 does not pass it on to its PEFT-adapter lookup, which
        kwargs["adapter_kwargs"] = {"local_files_only": True}  # would otherwise retry the Hub for ~23 s
    model = AutoModel.from_pretrained(source.path, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path, **common)
    return model, tokenizer
