"""NVLM-D: InternViT-6B tiles -> pixel shuffle -> `mlp1` -> Qwen2 decoder, whose `<|vision_pad|>` embeddings are
replaced by the image features.

The image features enter once, at prefill: `generate` builds the merged prompt embeddings and hands them to
transformers' generation loop, whose later steps read only the KV cache. Nothing here assumes a device: inputs
follow the embedding layer, image features follow the embeddings they replace, so any accelerate device map
(GPUs, CPU, disk) works.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import is_flash_attn_2_available, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_nvlm_d import NVLM_D_Config
from .conversation import (
    IM_END_TOKEN,
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    build_prompt,
    get_conv_template,
)
from .modeling_intern_vit import InternVisionModel

logger = logging.get_logger(__name__)


def _apply_use_flash_attn(config: NVLM_D_Config, use_flash_attn: bool | None) -> None:
    """Honour the model card's `use_flash_attn=` keyword unless an `attn_implementation` was asked for."""
    if not use_flash_attn or config._attn_implementation is not None:
        return
    if is_flash_attn_2_available():
        config._attn_implementation = "flash_attention_2"
    else:
        logger.warning_once("use_flash_attn=True but flash-attn is not installed: using PyTorch SDPA attention.")
        config._attn_implementation = "sdpa"


def _generation_kwargs(generation_config: dict | GenerationConfig | None) -> dict[str, Any]:
    """Keyword arguments for `generate`, in a fresh dict: the caller's dict or GenerationConfig is never modified."""
    if generation_config is None:
        return {}
    if isinstance(generation_config, GenerationConfig):
        return {"generation_config": copy.deepcopy(generation_config)}
    if isinstance(generation_config, dict):
        return dict(generation_config)
    raise TypeError(f"generation_config must be a dict or a GenerationConfig, got {type(generation_config).__name__}")


class NVLM_D_Model(PreTrainedModel, GenerationMixin):
    config_class = NVLM_D_Config
    config: NVLM_D_Config
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVisionModel", "Qwen2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(
        self,
        config: NVLM_D_Config,
        vision_model: InternVisionModel | None = None,
        language_model: Qwen2ForCausalLM | None = None,
        use_flash_attn: bool | None = None,
        vision_batch_size: int | None = None,
    ) -> None:
        """`use_flash_attn` is the model card's switch (flash-attn when installed, else SDPA); an explicit
        `attn_implementation` wins over it. `vision_batch_size` bounds how many tiles go through the vision tower
        at once (None: all), trading speed for peak memory; results do not change."""
        if vision_batch_size is not None and (
            isinstance(vision_batch_size, bool) or not isinstance(vision_batch_size, int) or vision_batch_size < 1
        ):
            raise ValueError(f"vision_batch_size must be a positive int or None, got {vision_batch_size!r}")
        _apply_use_flash_attn(config, use_flash_attn)
        super().__init__(config)
        self.template = config.template
        self.select_layer = config.select_layer
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = config.num_image_token
        self.img_context_token_id = config.image_token_id
        self.system_message = get_conv_template(config.template).system_message
        self.vision_batch_size = vision_batch_size

        # Modules in the order data flows through them: accelerate fills devices in this order, so the vision tower
        # and the projector land beside the decoder's embeddings.
        self.vision_model = vision_model if vision_model is not None else InternVisionModel(config.vision_config)
        vit_hidden = config.vision_config.hidden_size * round(1 / config.downsample_ratio) ** 2
        llm = config.llm_config
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vit_hidden),
            nn.Linear(vit_hidden, llm.intermediate_size, bias=False),
            nn.GELU(),
            nn.Linear(llm.intermediate_size, llm.hidden_size, bias=False),
        )
        self.language_model = language_model if language_model is not None else Qwen2ForCausalLM(config.llm_config)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    # ----------------------------------------------------------------------------------------------------------
    # Image features
    # ----------------------------------------------------------------------------------------------------------
    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        """[tiles, rows, cols, c] -> [tiles, rows * s, cols * s, c / s^2]: each output cell concatenates a
        1/s x 1/s block of input cells (for s = 0.5, in the order top-left, top-right, bottom-left, bottom-right).

        `ps_version` v2 keeps the row-major grid; v1 (the original InternVL order) leaves it transposed.
        """
        tiles, rows, cols, channels = x.shape
        x = x.reshape(tiles, rows, int(cols * scale_factor), int(channels / scale_factor))  # merge column pairs
        x = x.permute(0, 2, 1, 3)
        x = x.reshape(tiles, int(cols * scale_factor), int(rows * scale_factor), int(channels / scale_factor**2))
        if self.ps_version == "v1":
            logger.warning_once("ps_version 'v1' yields a transposed grid; NVLM-D and InternVL 1.5+ use 'v2'.")
            return x.contiguous()
        return x.permute(0, 2, 1, 3).contiguous()

    def _vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.select_layer == -1:
            hidden = self.vision_model(pixel_values, output_hidden_states=False, return_dict=True).last_hidden_state
        else:
            outputs = self.vision_model(pixel_values, output_hidden_states=True, return_dict=True)
            hidden = outputs.hidden_states[self.select_layer]
        patches = hidden[:, 1:, :]  # the class token is dropped
        grid = round(patches.shape[1] ** 0.5)
        shuffled = self.pixel_shuffle(patches.reshape(patches.shape[0], grid, grid, -1), self.downsample_ratio)
        return shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1])

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, 448, 448] -> image features [tiles, 256, llm hidden size].

        `pixel_values` are cast to the vision tower's dtype and device. When `vision_batch_size` is set, tiles go
        through the tower that many at a time, bounding activation memory; the result is the same.
        """
        first_param = self.vision_model.embeddings.patch_embedding.weight
        pixel_values = pixel_values.to(device=first_param.device, dtype=first_param.dtype)
        chunk = self.vision_batch_size or pixel_values.shape[0]
        features = torch.cat([self._vision_features(part) for part in pixel_values.split(chunk)])
        return self.mlp1(features)

    def _check_pixel_values(self, pixel_values: Any) -> torch.Tensor:
        vision = self.config.vision_config
        expected = f"[num_tiles, {vision.num_channels}, {vision.image_size}, {vision.image_size}]"
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(
                f"pixel_values must be a torch.Tensor of shape {expected}, got {type(pixel_values).__name__}"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[0] == 0 or shape[1:] != (vision.num_channels, vision.image_size, vision.image_size):
            raise ValueError(f"pixel_values must have shape {expected}, got {list(shape)}")
        return pixel_values

    def _check_visual_features(self, visual_features: Any) -> torch.Tensor:
        width = self.mlp1[0].normalized_shape[0]
        expected = f"[num_tiles, {self.num_image_token}, {width}]"
        if not isinstance(visual_features, torch.Tensor):
            raise TypeError(
                f"visual_features must be a torch.Tensor of shape {expected}, got {type(visual_features).__name__}"
            )
        shape = tuple(visual_features.shape)
        if len(shape) != 3 or shape[0] == 0 or shape[1:] != (self.num_image_token, width):
            raise ValueError(
                f"visual_features must have shape {expected} (pixel-shuffled ViT outputs), got {list(shape)}"
            )
        return visual_features

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder-ready image features [tiles, 256, llm hidden size] from pixel values, or from precomputed
        `visual_features` (pixel-shuffled ViT outputs [tiles, 256, 12800]), which skip the vision tower.
        `image_flags` ([tiles] or [tiles, 1], 1 for a real tile) drops padding tiles of a training batch."""
        if visual_features is not None:
            visual_features = self._check_visual_features(visual_features)
            mlp1_param = self.mlp1[1].weight
            features = self.mlp1(visual_features.to(device=mlp1_param.device, dtype=mlp1_param.dtype))
        else:
            features = self.extract_feature(self._check_pixel_values(pixel_values))
        if image_flags is not None:
            flags = image_flags.reshape(-1)
            if flags.shape[0] != features.shape[0]:
                raise ValueError(f"image_flags has {flags.shape[0]} entries but there are {features.shape[0]} tiles")
            features = features[flags.to(features.device) == 1]
        return features

    def merge_image_features(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Replace the embedding of every `<|vision_pad|>` position, in order, by one image token.

        Raises:
            ValueError: the number of `<|vision_pad|>` tokens differs from the number of image tokens.
        """
        mask = input_ids == self.img_context_token_id
        num_placeholders = int(mask.sum())
        image_tokens = image_features.reshape(-1, image_features.shape[-1])
        if num_placeholders != image_tokens.shape[0]:
            raise ValueError(
                f"The prompt has {num_placeholders} image tokens (id {self.img_context_token_id}) but the images give "
                f"{image_tokens.shape[0]} features ({image_features.shape[0]} tiles x {self.num_image_token}); "
                "build the prompt with the same num_patches_list as the pixel_values."
            )
        mask = mask.unsqueeze(-1).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(mask, image_tokens.to(inputs_embeds.device, inputs_embeds.dtype))

    def _embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        embeddings = self.get_input_embeddings()
        return embeddings(input_ids.to(embeddings.weight.device))

    # ----------------------------------------------------------------------------------------------------------
    # Forward and generation
    # ----------------------------------------------------------------------------------------------------------
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        image_flags: torch.Tensor | None = None,
        cache: Any | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (and, with `labels`, the shifted next-token loss, -100 ignored) of the decoder over the
        prompt, whose `<|vision_pad|>` embeddings are replaced by the features of `pixel_values`
        (or `visual_features`). Works without images (text only) and without torch.distributed."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids)
        if pixel_values is not None or visual_features is not None:
            if input_ids is None:
                raise ValueError("Images need input_ids, to find the <|vision_pad|> positions their features replace")
            image_features = self.get_image_features(pixel_values, visual_features, image_flags)
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return outputs if return_dict else outputs.to_tuple()

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor | Any:
        """Generate from a prompt and its images; returns the new tokens only (as the reference does).

        The prompt's `<|vision_pad|>` embeddings are replaced by the image features once; transformers' loop
        (greedy, sampling, beams, stop strings, streamers, static caches) then runs on the merged embeddings.
        """
        if "inputs_embeds" in generate_kwargs:
            if pixel_values is not None or visual_features is not None:
                raise ValueError("Pass images with input_ids, not with inputs_embeds (their features are merged in)")
            inputs_embeds = generate_kwargs.pop("inputs_embeds")
        else:
            input_ids = self._check_input_ids(input_ids)
            inputs_embeds = self._embed(input_ids)
            if pixel_values is not None or visual_features is not None:
                image_features = self.get_image_features(pixel_values, visual_features)
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
            elif bool((input_ids == self.img_context_token_id).any()):
                raise ValueError(
                    f"The prompt has image tokens (id {self.img_context_token_id}) but no pixel_values were given"
                )
        if attention_mask is not None:
            attention_mask = attention_mask.to(inputs_embeds.device)
        return super().generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            generation_config=generation_config,
            **generate_kwargs,
        )

    @staticmethod
    def _check_input_ids(input_ids: Any) -> torch.LongTensor:
        if input_ids is None:
            raise ValueError("generate needs input_ids (or inputs_embeds)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
            raise TypeError(
                f"input_ids must be an integer torch.Tensor, got {getattr(input_ids, 'dtype', type(input_ids))}"
            )
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [batch, prompt_length > 0], got {list(input_ids.shape)}")
        return input_ids

    # ----------------------------------------------------------------------------------------------------------
    # Chat (the reference API)
    # ----------------------------------------------------------------------------------------------------------
    def _num_tiles(self, pixel_values: torch.Tensor | None, visual_features: torch.Tensor | None) -> int:
        if visual_features is not None:
            return self._check_visual_features(visual_features).shape[0]
        if pixel_values is not None:
            return self._check_pixel_values(pixel_values).shape[0]
        return 0

    @staticmethod
    def _check_num_patches(num_patches_list: Any, num_tiles: int) -> list[int]:
        if num_patches_list is None:
            return [num_tiles] if num_tiles else []
        if not isinstance(num_patches_list, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in num_patches_list
        ):
            raise TypeError(f"num_patches_list must be a list of positive ints, got {num_patches_list!r}")
        if sum(num_patches_list) != num_tiles:
            raise ValueError(
                f"num_patches_list sums to {sum(num_patches_list)} tiles but pixel_values holds {num_tiles} tiles"
            )
        return list(num_patches_list)

    def _generate_text(
        self,
        tokenizer: Any,
        prompts: list[str],
        generation_config: dict | GenerationConfig | None,
        pixel_values: torch.Tensor | None,
        visual_features: torch.Tensor | None,
        streamer: Any = None,
    ) -> list[str]:
        """Tokenize prompts (left-padded when several), generate until `<|im_end|>`, decode and strip."""
        input_ids, attention_mask = _left_pad(
            [tokenizer(p, return_tensors="pt").input_ids[0] for p in prompts], tokenizer
        )
        kwargs = _generation_kwargs(generation_config)
        kwargs["eos_token_id"] = tokenizer.convert_tokens_to_ids(IM_END_TOKEN)
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        output_ids = self.generate(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            visual_features=visual_features,
            streamer=streamer,
            tokenizer=tokenizer,
            **kwargs,
        )
        sequences = output_ids if isinstance(output_ids, torch.Tensor) else output_ids.sequences
        texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
        return [text.split(IM_END_TOKEN)[0].strip() for text in texts]

    def _chat(
        self,
        mode: str,
        tokenizer: Any,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict | GenerationConfig | None,
        history: Sequence[tuple[str, str]] | None,
        num_patches_list: Sequence[int] | None,
        image_context_token: str,
        verbose: bool,
        visual_features: torch.Tensor | None,
        streamer: Any,
    ) -> tuple[str, list[tuple[str, str]]]:
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}")
        num_patches_list = self._check_num_patches(num_patches_list, self._num_tiles(pixel_values, visual_features))
        if num_patches_list and history is None and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(image_context_token)
        prompt = build_prompt(
            question,
            num_patches_list,
            history,
            template=self.template,
            system_message=self.system_message,
            num_image_token=self.num_image_token,
            context_token=image_context_token,
            mode=mode,
        )
        if verbose:
            logger.warning(f"NVLM-D prompt (image tokens hidden):\n{prompt.replace(image_context_token, '')}")
        (response,) = self._generate_text(
            tokenizer, [prompt], generation_config, pixel_values, visual_features, streamer
        )
        if verbose:
            logger.warning(f"NVLM-D response: {response}")
        return response, [*(history or []), (question, response)]

    def chat(
        self,
        tokenizer: Any,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict | GenerationConfig | None,
        history: Sequence[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: Sequence[int] | None = None,
        IMG_START_TOKEN: str = "<|vision_start|>",
        IMG_END_TOKEN: str = "<|vision_end|>",
        IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN,
        verbose: bool = False,
        visual_features: torch.Tensor | None = None,
        streamer: Any = None,
    ) -> str | tuple[str, list[tuple[str, str]]]:
        """Answer `question` about the images in `pixel_values` (None for text only), as NVLM-D's reference does.

        Args:
            tokenizer: the model's tokenizer.
            pixel_values: [tiles, 3, 448, 448] from `load_image` (any float dtype and device), or None.
            question: the user's turn; `<image>` marks where each image goes (`<image>\\n` is put in front
                when there are images, no history and no placeholder).
            generation_config: dict (or GenerationConfig) of generation settings, e.g.
                `dict(max_new_tokens=1024, do_sample=False)`; not modified.
            history: earlier (question, answer) pairs; not modified.
            return_history: also return the history with this turn appended.
            num_patches_list: tiles per image when `pixel_values` stacks several images.
            IMG_START_TOKEN, IMG_END_TOKEN: accepted for compatibility; NVLM wraps images in `<Image>`
                and `</Image>` text, as the reference does.
            IMG_CONTEXT_TOKEN: the token whose embeddings are replaced by image features.
            verbose: log the prompt (without image tokens) and the response.
            visual_features: precomputed pixel-shuffled ViT outputs [tiles, 256, 12800], used instead of
                running the vision tower.
            streamer: a transformers streamer (e.g. `TextIteratorStreamer(tokenizer, skip_prompt=True)`).

        Returns:
            The response (generation stops at `<|im_end|>`; the text is stripped), and the new history when
            `return_history` is true.
        """
        response, new_history = self._chat(
            "chat",
            tokenizer,
            pixel_values,
            question,
            generation_config,
            history,
            num_patches_list,
            IMG_CONTEXT_TOKEN,
            verbose,
            visual_features,
            streamer,
        )
        return (response, new_history) if return_history else response

    def chat_without_sys_prompt(
        self,
        tokenizer: Any,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict | GenerationConfig | None,
        history: Sequence[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: Sequence[int] | None = None,
        IMG_START_TOKEN: str = "<|vision_start|>",
        IMG_END_TOKEN: str = "<|vision_end|>",
        IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN,
        verbose: bool = False,
        visual_features: torch.Tensor | None = None,
        streamer: Any = None,
    ) -> str | tuple[str, list[tuple[str, str]]]:
        """`chat` with a prompt that has no system turn: `<|im_start|>user\\n...<|im_end|><|im_start|>assistant\\n`.

        (The reference's version cuts the prompt in the middle of its system text; this one builds what its name
        says.)"""
        response, new_history = self._chat(
            "no_system",
            tokenizer,
            pixel_values,
            question,
            generation_config,
            history,
            num_patches_list,
            IMG_CONTEXT_TOKEN,
            verbose,
            visual_features,
            streamer,
        )
        return (response, new_history) if return_history else response

    def chat_without_chat_prompt(
        self,
        tokenizer: Any,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict | GenerationConfig | None,
        num_patches_list: Sequence[int] | None = None,
        IMG_START_TOKEN: str = "<|vision_start|>",
        IMG_END_TOKEN: str = "<|vision_end|>",
        IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN,
        verbose: bool = False,
        visual_features: torch.Tensor | None = None,
        streamer: Any = None,
    ) -> str:
        """Complete the bare question (placeholders expanded, no conversation template)."""
        response, _ = self._chat(
            "raw",
            tokenizer,
            pixel_values,
            question,
            generation_config,
            None,
            num_patches_list,
            IMG_CONTEXT_TOKEN,
            verbose,
            visual_features,
            streamer,
        )
        return response

    def batch_chat(
        self,
        tokenizer: Any,
        pixel_values: torch.Tensor | None,
        questions: Sequence[str],
        generation_config: dict | GenerationConfig | None,
        num_patches_list: Sequence[int | Sequence[int]] | None = None,
        IMG_START_TOKEN: str = "<|vision_start|>",
        IMG_END_TOKEN: str = "<|vision_end|>",
        IMG_CONTEXT_TOKEN: str = IMG_CONTEXT_TOKEN,
        verbose: bool = False,
        visual_features: torch.Tensor | None = None,
    ) -> list[str]:
        """Answer several single-turn questions in one left-padded batch; each answer equals that of `chat`.

        `num_patches_list` has one entry per question: the tile count of its image (0 for a text-only
        question), or a list of tile counts when it has several images. `pixel_values` stacks every tile in
        question order. Without `num_patches_list`, every question is text only (then `pixel_values` must be
        None) or, when `pixel_values` is given and there is one question, it gets all the tiles.
        """
        if isinstance(questions, str) or not isinstance(questions, Sequence) or not questions:
            raise TypeError("questions must be a non-empty list of strings")
        num_tiles = self._num_tiles(pixel_values, visual_features)
        per_question = _images_per_question(num_patches_list, len(questions), num_tiles)
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        prompts = []
        for question, tiles in zip(questions, per_question, strict=True):
            if not isinstance(question, str):
                raise TypeError(f"each question must be a string, got {type(question).__name__}")
            prompts.append(
                build_prompt(
                    question,
                    tiles,
                    template=self.template,
                    system_message=self.system_message,
                    num_image_token=self.num_image_token,
                    context_token=IMG_CONTEXT_TOKEN,
                )
            )
        if verbose:
            for prompt in prompts:
                logger.warning(f"NVLM-D prompt (image tokens hidden):\n{prompt.replace(IMG_CONTEXT_TOKEN, '')}")
        return self._generate_text(tokenizer, prompts, generation_config, pixel_values, visual_features)


def _images_per_question(
    num_patches_list: Sequence[int | Sequence[int]] | None, num_questions: int, num_tiles: int
) -> list[list[int]]:
    """Normalise batch_chat's `num_patches_list` to a list of tile counts per question."""
    if num_patches_list is None:
        if num_tiles and num_questions != 1:
            raise ValueError(f"pass num_patches_list to say which of the {num_tiles} tiles belong to which question")
        return [[num_tiles] if num_tiles else []] * num_questions
    if not isinstance(num_patches_list, (list, tuple)) or len(num_patches_list) != num_questions:
        raise ValueError(
            f"num_patches_list must have one entry per question ({num_questions}), got {num_patches_list!r}"
        )
    per_question = []
    for entry in num_patches_list:
        counts = [entry] if isinstance(entry, int) else entry
        if not isinstance(counts, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts
        ):
            raise TypeError(f"num_patches_list entries must be tile counts (ints >= 0) or lists of them, got {entry!r}")
        per_question.append([n for n in counts if n > 0])
    total = sum(sum(counts) for counts in per_question)
    if total != num_tiles:
        raise ValueError(f"num_patches_list sums to {total} tiles but pixel_values holds {num_tiles} tiles")
    return per_question


def _left_pad(sequences: list[torch.Tensor], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token sequences, padded on the left (so every prompt ends where generation starts)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    length = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, length - len(seq) :] = seq
        attention_mask[row, length - len(seq) :] = 1
    return input_ids, attention_mask


NVLM_D_Model.register_for_auto_class("AutoModel")
