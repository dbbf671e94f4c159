"""bitsandbytes settings for NVLM-D: quantize the decoder, keep the vision tower and projector in bf16.

InternViT-6B loses accuracy under 4-bit quantization, and its 6B parameters are a small part of the model
(the 72B decoder holds the memory), so only the decoder's linear layers are quantized; the LM head stays in
bf16 as well, as is usual for bitsandbytes.
"""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

KEEP_IN_BF16 = ("vision_model", "mlp1", "lm_head")


def bitsandbytes_config(bits: int) -> BitsAndBytesConfig:
    """A `quantization_config` for `from_pretrained`: 8 (LLM.int8) or 4 (NF4, double quantization, bf16 compute).

    Raises:
        ValueError: `bits` is neither 8 nor 4.
    """
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(KEEP_IN_BF16))
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=list(KEEP_IN_BF16),
        )
    raise ValueError(f"bits must be 8 or 4, got {bits!r}")
