"""NVLM-D's processor: the tokenizer, the image processor and the chat template, as transformers' multimodal
processors are (`AutoProcessor`, `apply_chat_template`, `pipeline("image-text-to-text")`).

Each `<image>` placeholder of the text (the chat template renders an image part as `<image>\\n`) is replaced by the
prompt of that image: `<Image>`, a tile tag and 256 `<|vision_pad|>` tokens per tile, `</Image>`
(`conversation.image_prompt`). So the input ids are those of the prompt `chat` builds for the same conversation, and
the pixel values those of `load_image`, which is what `model.generate(**inputs)` needs to answer as `chat` does.

A directory without this processor's files (NVIDIA's released snapshot: a CLIP `preprocessor_config.json` and Qwen2.5's
chat template, both never read by NVLM-D's own code) gets the processor its `config.json` describes instead, with
NVLM's chat template: `from_pretrained` never builds a CLIP image processor or Qwen's system prompt for NVLM-D.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from transformers import AutoTokenizer, GenerationConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import PROCESSOR_NAME, cached_file, logging

from .configuration_nvlm_d import NVLM_D_Config
from .conversation import CHAT_TEMPLATE, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, image_prompt
from .image_processing_nvlm_d import NVLM_D_ImageProcessor

logger = logging.get_logger(__name__)

# What `from_pretrained` passes on to the config and tokenizer of a directory without processor files.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")


class NVLM_D_Processor(ProcessorMixin):
    """Tokenizer + `NVLM_D_ImageProcessor` + NVLM's chat template.

    `processor(text=..., images=...)` expands every `<image>` of `text`, in order, with the next image's tiles;
    `processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
    return_tensors="pt")` renders chat messages (`{"type": "image", "image": path | PIL image}` parts included)
    first. Outputs: `input_ids`, `attention_mask` (left padding, for batched generation: the processor sets its
    tokenizer's `padding_side` to "left") and `pixel_values`.
    Tiling settings (`max_dynamic_patch`, ...) may be passed per call; their defaults are the image processor's.
    """

    image_token = IMAGE_PLACEHOLDER  # what the text holds: one per image, expanded to the image's prompt
    text_kwargs = {"padding_side": "left"}

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        image_seq_length: int = 256,
        image_context_token: str = IMG_CONTEXT_TOKEN,
        **kwargs,
    ) -> None:
        """`image_seq_length` is the number of `image_context_token`s (`<|vision_pad|>`) per tile (256)."""
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
        self.image_seq_length = image_seq_length
        self.image_context_token = image_context_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        # Generation continues each row from its last token, so a batch is padded on the left: also where others
        # pad with this tokenizer (`pipeline(..., batch_size=n)` does), and for a checkpoint whose tokenizer config
        # says right (the released one names no side, and the default is right).
        self.tokenizer.padding_side = "left"

    @classmethod
    def from_model_config(cls, config: Any, tokenizer: Any, chat_template: str | None = None) -> NVLM_D_Processor:
        """The processor of a model with this `NVLM_D_Config`: its tile size, tiling limits (`min_dynamic_patch`,
        `max_dynamic_patch`, `use_thumbnail`) and image tokens per tile."""
        image_processor = NVLM_D_ImageProcessor(
            image_size=config.force_image_size,
            min_dynamic_patch=config.min_dynamic_patch,
            max_dynamic_patch=config.max_dynamic_patch,
            use_thumbnail=config.use_thumbnail,
        )
        return cls(image_processor, tokenizer, chat_template=chat_template, image_seq_length=config.num_image_token)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> NVLM_D_Processor:
        """The processor a model directory (or Hub id) saved; for one that saved none (`processor_config.json`
        absent, as in NVIDIA's released snapshot), the processor of its `config.json` (`from_model_config`) with
        its tokenizer and NVLM's chat template, whatever template its tokenizer files carry. Nothing is written."""
        hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
        lookup = {key: value for key, value in hub_kwargs.items() if key != "trust_remote_code"}
        saved = cached_file(
            pretrained_model_name_or_path,
            PROCESSOR_NAME,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **lookup,
        )
        if saved is not None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        logger.info(
            f"{pretrained_model_name_or_path} has no {PROCESSOR_NAME}: NVLM-D's processor is built from its "
            "config.json (tiling limits) and its tokenizer, with NVLM's chat template"
        )
        config = NVLM_D_Config.from_pretrained(pretrained_model_name_or_path, **lookup)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        tokenizer.chat_template = CHAT_TEMPLATE  # the processor's and its tokenizer's renderings stay equal
        return cls.from_model_config(config, tokenizer, chat_template=CHAT_TEMPLATE)

    def __call__(self, images: Any = None, text: Any = None, **kwargs) -> BatchFeature:
        _refuse_generation_settings(kwargs)
        outputs = super().__call__(images=images, text=text, **kwargs)
        outputs.pop("num_patches", None)  # spent on the prompt; the model reads the tiles in order
        return outputs

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        num_tiles = int(image_inputs["num_patches"][image_idx])
        return image_prompt(num_tiles, self.image_seq_length, self.image_context_token)

    @property
    def model_input_names(self) -> list[str]:
        return [*self.tokenizer.model_input_names, *self.image_processor.model_input_names]


@cache
def _generation_settings() -> frozenset[str]:
    """The names of `generate`'s settings, less `max_length`, which is also the tokenizer's truncation length."""
    names = GenerationConfig().to_dict()
    return frozenset(name for name in names if not name.startswith("_")) - {"max_length", "transformers_version"}


def _refuse_generation_settings(kwargs: dict[str, Any]) -> None:
    """A generation setting given to the processor (`pipeline(..., do_sample=False)` hands it there) would be
    dropped, so a sampled answer would silently be greedy: say where it goes instead."""
    names = sorted(set(kwargs) & _generation_settings())
    if names:
        example = ", ".join(f"{name!r}: {kwargs[name]!r}" for name in names)
        raise ValueError(
            f"generation settings ({', '.join(names)}) cannot be applied by the processor, which only prepares the "
            f"inputs: pass them to generation, as pipeline(..., generate_kwargs={{{example}}}) or "
            "model.generate(**inputs, ...)"
        )


NVLM_D_Processor.register_for_auto_class("AutoProcessor")
