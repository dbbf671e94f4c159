"""Where NVLM-D's `generate` contract differs from transformers', the adapters that keep both working.

- The reference's `generate` returns the NEW tokens only, and its clients rely on it; transformers' callers that
  expect whole sequences get them: an NVLM-D draft model in assisted decoding (`DraftModel`) and the text-generation
  pipeline (`called_by_text_generation_pipeline`), which cuts the prompt's length off what `generate` returns.
- Images have one row per tile, not per prompt, so beams and `num_return_sequences` repeat each prompt's tiles as one
  group (`repeat_tiles_per_prompt`), where transformers would repeat every row in place.

The modeling module imports this one; it imports nothing from the modeling module.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin

from .model_inputs import uncached_tokens

# Generation inputs with one row per image tile (not per prompt).
PER_TILE_INPUTS = ("pixel_values", "visual_features", "image_flags")


class DraftModel:
    """An `assistant_model` as transformers' assisted decoding calls it: its `generate` must return whole sequences,
    and a text-only draft (a small Qwen2) must not be handed the images, which the candidate generator passes on
    with every other model keyword. `reads_images`: the draft is an NVLM-D model (new tokens only, images read)."""

    def __init__(self, model: nn.Module, reads_images: bool) -> None:
        self.model = model
        self.reads_images = reads_images

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def generate(self, **kwargs) -> Any:
        if self.reads_images:
            return GenerationMixin.generate(self.model, **kwargs)  # transformers' own: whole sequences
        for name in PER_TILE_INPUTS:
            kwargs.pop(name, None)
        return self.model.generate(**kwargs)


def called_by_text_generation_pipeline(caller: FrameType | None) -> bool:
    """Whether the frame `caller` (that of the code calling `generate`) is a method of transformers'
    `TextGenerationPipeline`. The pipeline passes `generate` nothing that tells it apart from a direct call and
    reads no model attribute before it slices the output, so the caller is the only sign. Looked up in
    `sys.modules` only: a process that never loaded the pipeline does not import it."""
    pipelines = sys.modules.get("transformers.pipelines.text_generation")
    if pipelines is None or caller is None:
        return False
    return isinstance(caller.f_locals.get("self"), pipelines.TextGenerationPipeline)


def drop_prompt(outputs: torch.LongTensor | Any, prompt_length: int) -> torch.LongTensor | Any:
    """`generate`'s output (a tensor or a `return_dict_in_generate` output) without the first `prompt_length`
    tokens of its sequences."""
    if isinstance(outputs, torch.Tensor):
        return outputs[:, prompt_length:]
    outputs.sequences = outputs.sequences[:, prompt_length:]
    return outputs


def repeat_tiles_per_prompt(
    input_ids: torch.LongTensor | None,
    cache: Any | None,
    images: dict[str, torch.Tensor],
    expand_size: int,
    config: Any,
) -> dict[str, torch.Tensor]:
    """`images` (per-tile tensors) with each prompt's tiles repeated `expand_size` times as a group: `[t0, t1]` of a
    2-tile prompt becomes `[t0, t1, t0, t1]`, so that every copy of the prompt reads its own tiles, in order.
    (transformers' expansion repeats every row in place, `[t0, t0, t1, t1]`: each copy would read another's tiles.)

    A prompt's tiles are as many as its image tokens (`config.image_token_id`) not yet in `cache` make tiles of
    `config.num_image_token`; `image_flags` first drops the padding tiles (flag 0), which belong to no prompt, so
    the expanded images need no flags.
    """
    if input_ids is None:
        raise ValueError("Images need input_ids, to find the <|vision_pad|> positions their features replace")
    image_token_id, num_image_token = config.image_token_id, config.num_image_token
    input_ids = uncached_tokens(input_ids, cache)
    flags = images.pop("image_flags", None)
    if flags is not None:
        real = flags.reshape(-1) == 1
        for name, tiles in images.items():
            if real.shape[0] != tiles.shape[0]:
                raise ValueError(f"image_flags has {real.shape[0]} entries but there are {tiles.shape[0]} tiles")
            images[name] = tiles[real.to(tiles.device)]
    tokens = (input_ids == image_token_id).sum(dim=1).tolist()
    if any(count % num_image_token for count in tokens):
        raise ValueError(
            f"Each prompt's image tokens (id {image_token_id}) must be whole tiles of {num_image_token}; the prompts "
            f"have {tokens}"
        )
    tiles_per_prompt = [count // num_image_token for count in tokens]
    expanded = {}
    for name, tiles in images.items():
        if sum(tiles_per_prompt) != tiles.shape[0]:
            raise ValueError(
                f"The prompts' image tokens make {sum(tiles_per_prompt)} tiles ({tiles_per_prompt} per prompt) but "
                f"{name} holds {tiles.shape[0]}; build the prompts with the same num_patches_list as the images."
            )
        groups = tiles.split(tiles_per_prompt)
        expanded[name] = torch.cat([group for group in groups for _ in range(expand_size)])
    return expanded
