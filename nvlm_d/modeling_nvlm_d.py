"""NVLM-D: InternViT-6B tiles -> pixel shuffle -> `mlp1` -> Qwen2 decoder, whose `<|vision_pad|>` embeddings are
replaced by the image features.

The image features enter in `forward`, as in transformers' own InternVL: `forward(input_ids, pixel_values, ...)`
embeds the prompt and scatters one image token into every `<|vision_pad|>` position. `generate` is transformers'
own loop (`prepare_inputs_for_generation` passes the images at prefill only), so every decoding feature works:
sampling, beams, assisted decoding, stop strings, streamers, static caches, `torch.compile`. Nothing here assumes a
device: inputs go where the module that reads them executes, so any accelerate device map (GPUs, CPU, disk) works.

The model card's chat API (`chat`, `batch_chat`, `start_chat`, ...) comes from `chat_nvlm_d.NVLMChatMixin` and
InternVL's LoRA helpers (`wrap_llm_lora`, `wrap_backbone_lora`) from `lora_nvlm_d.NVLMLoraMixin`: base classes of
`NVLM_D_Model`, in modules that import nothing from this one.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import is_flash_attn_2_available, logging
from transformers.utils.deprecation import deprecate_kwarg

from .chat_nvlm_d import NVLMChatMixin
from .configuration_nvlm_d import NVLM_D_Config
from .lora_nvlm_d import NVLMLoraMixin
from .model_inputs import check_pixel_values, check_visual_features, execution_device
from .modeling_intern_vit import InternVisionModel

logger = logging.get_logger(__name__)

# Generation inputs with one row per image tile (not per prompt): expanded for beams a prompt's tiles at a time.
_PER_TILE_INPUTS = ("pixel_values", "visual_features", "image_flags")


def _apply_use_flash_attn(config: NVLM_D_Config, use_flash_attn: bool | None) -> None:
    """Honour the model card's `use_flash_attn=` keyword unless an `attn_implementation` was asked for."""
    if not use_flash_attn or config._attn_implementation is not None:
        return
    if is_flash_attn_2_available():
        config._attn_implementation = "flash_attention_2"
    else:
        logger.warning_once("use_flash_attn=True but flash-attn is not installed: using PyTorch SDPA attention.")
        config._attn_implementation = "sdpa"


class _DraftModel:
    """An `assistant_model` as transformers' assisted decoding calls it: its `generate` must return whole sequences
    (NVLM-D's own returns the new tokens only), and a text-only draft (a small Qwen2) must not be handed the images,
    which the candidate generator passes on with every other model keyword."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def generate(self, **kwargs) -> Any:
        if isinstance(self.model, NVLM_D_Model):
            return GenerationMixin.generate(self.model, **kwargs)
        for name in _PER_TILE_INPUTS:
            kwargs.pop(name, None)
        return self.model.generate(**kwargs)


def _restarts_positions(position_ids: torch.Tensor | None) -> bool:
    """Whether `position_ids` [batch, tokens] hold packed examples: positions that do not count up by one."""
    if position_ids is None or position_ids.ndim != 2 or position_ids.shape[1] < 2:
        return False
    return bool((position_ids.diff(dim=-1) != 1).any())


def _weighted_loss(logits: torch.Tensor, labels: torch.Tensor, loss_weight: Any) -> torch.Tensor:
    """InternVL's weighted loss: sum(w * cross-entropy) / sum(w) over the shifted positions (-100 labels add 0 to the
    numerator; their weights still count in the denominator, as in InternVL)."""
    weights = torch.as_tensor(loss_weight, dtype=torch.float32, device=logits.device)
    if weights.shape != labels.shape:
        raise ValueError(f"loss_weight must have the shape of labels {list(labels.shape)}, got {list(weights.shape)}")
    shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    shift_weights = weights[:, 1:].reshape(-1)
    losses = nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="none")
    return (losses * shift_weights).sum() / shift_weights.sum()


def _called_by_text_generation_pipeline() -> bool:
    """Whether the caller of `NVLM_D_Model.generate` (two frames up from here) is transformers' text-generation
    pipeline. Looked up in `sys.modules` only: a process that never loaded the pipeline does not import it."""
    pipelines = sys.modules.get("transformers.pipelines.text_generation")
    if pipelines is None:
        return False
    caller = sys._getframe(2).f_locals.get("self")
    return isinstance(caller, pipelines.TextGenerationPipeline)


class NVLM_D_Model(NVLMChatMixin, NVLMLoraMixin, PreTrainedModel, GenerationMixin):
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
        self._wrap_saved_lora()
        if self.generation_config.pad_token_id is None:
            # Qwen2's tokenizer pads with <|endoftext|>, the id the decoder config calls bos_token_id; knowing it,
            # `generate` infers the attention mask of left-padded input_ids passed without one.
            self.generation_config.pad_token_id = llm.pad_token_id if llm.pad_token_id is not None else llm.bos_token_id

    # ----------------------------------------------------------------------------------------------------------
    # What InternVL-style code reads off the model (all derived from the config)
    # ----------------------------------------------------------------------------------------------------------
    @property
    def num_image_token(self) -> int:
        """Decoder tokens per tile (256)."""
        return self.config.num_image_token

    @property
    def template(self) -> str:
        return self.config.template

    @property
    def img_context_token_id(self) -> int:
        """The id of `<|vision_pad|>`, whose embeddings the image features replace (`config.image_token_id`)."""
        return self.config.image_token_id

    @img_context_token_id.setter
    def img_context_token_id(self, value: int) -> None:
        # InternVL training and evaluation scripts assign the tokenizer's context-token id here.
        if value != self.config.image_token_id:
            raise ValueError(
                f"NVLM-D's image features replace token id {self.config.image_token_id} (<|vision_pad|>, "
                f"config.image_token_id); got {value}"
            )

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the token embeddings execute on. (transformers reports the first parameter's
        device, which is `meta` when the vision tower is offloaded, and `inputs.to(model.device)` would fail.)"""
        return execution_device(self.get_input_embeddings())

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
        k = round(1 / scale_factor)
        # cell (i, j) of the output gathers input cells (k i + a, k j + b), ordered by a, then b, then channel: one
        # copy of strided views (the reference's reshape/permute chain makes the same values with three copies)
        blocks = x.reshape(tiles, rows // k, k, cols // k, k, channels)  # [tiles, i, a, j, b, c]
        if self.config.ps_version == "v1":
            logger.warning_once("ps_version 'v1' yields a transposed grid; NVLM-D and InternVL 1.5+ use 'v2'.")
            return blocks.permute(0, 3, 1, 2, 4, 5).reshape(tiles, cols // k, rows // k, k * k * channels)
        return blocks.permute(0, 1, 3, 2, 4, 5).reshape(tiles, rows // k, cols // k, k * k * channels)

    def _encode_tiles(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk of tiles -> (the selected ViT hidden state, its pixel-shuffled patch tokens)."""
        select_layer = self.config.select_layer
        outputs = self.vision_model(pixel_values, output_hidden_states=select_layer != -1, return_dict=True)
        hidden = outputs.last_hidden_state if select_layer == -1 else outputs.hidden_states[select_layer]
        patches = hidden[:, 1:, :]  # the class token is dropped
        grid = round(patches.shape[1] ** 0.5)
        shuffled = self.pixel_shuffle(patches.reshape(patches.shape[0], grid, grid, -1), self.config.downsample_ratio)
        return hidden, shuffled.reshape(shuffled.shape[0], -1, shuffled.shape[-1])

    def _encode(self, pixel_values: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked pixel values -> (ViT hidden state, visual features), `vision_batch_size` tiles at a time."""
        pixel_values = check_pixel_values(pixel_values, self.config)
        first_param = self.vision_model.embeddings.patch_embedding.weight
        pixel_values = pixel_values.to(device=execution_device(self.vision_model), dtype=first_param.dtype)
        chunk = self.vision_batch_size or pixel_values.shape[0]
        parts = [self._encode_tiles(part) for part in pixel_values.split(chunk)]
        if len(parts) == 1:  # all tiles at once: no copy through torch.cat
            return parts[0]
        return torch.cat([hidden for hidden, _ in parts]), torch.cat([features for _, features in parts])

    def get_visual_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, 448, 448] -> the pixel-shuffled ViT outputs [tiles, 256, 12800] that `chat(visual_features=...)`,
        `generate` and `forward` accept in place of `pixel_values` (the projector `mlp1` still runs on them).

        Use it to encode an image once and ask several questions about it, or to cache features on disk.
        """
        return self._encode(pixel_values)[1]

    def project_visual_features(self, visual_features: Any) -> torch.Tensor:
        """`mlp1` on visual features [tiles, 256, 12800] -> decoder-ready image features [tiles, 256, hidden]."""
        visual_features = check_visual_features(visual_features, self.config)
        # The LayerNorm's dtype (its weight comes first): a quantized projector stores its Linear weights as int8/uint8.
        # Not `self.mlp1[0]`: peft may wrap the projector (`modules_to_save`) in a module that cannot be indexed.
        norm_dtype = next(self.mlp1.parameters()).dtype
        return self.mlp1(visual_features.to(device=execution_device(self.mlp1), dtype=norm_dtype))

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """transformers' multimodal interface: `last_hidden_state` is the ViT hidden state the features are read from
        ([tiles, 1025, 3200], class token included) and `pooler_output` the decoder-ready image features
        [tiles, 256, llm hidden size], one per `<|vision_pad|>` token."""
        hidden, visual_features = self._encode(pixel_values)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden, pooler_output=self.project_visual_features(visual_features)
        )

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The reference's name: [tiles, 3, 448, 448] -> image features [tiles, 256, llm hidden size].

        `pixel_values` (any float dtype and device) are cast to the vision tower's dtype and device. When
        `vision_batch_size` is set, tiles go through the tower that many at a time, bounding activation memory; the
        result is the same.
        """
        return self.project_visual_features(self.get_visual_features(pixel_values))

    def _image_features(
        self,
        pixel_values: torch.Tensor | None,
        visual_features: torch.Tensor | None,
        image_flags: torch.Tensor | None,
    ) -> torch.Tensor:
        """Decoder-ready features of the real tiles: from `visual_features` when given, else from `pixel_values`;
        `image_flags` ([tiles] or [tiles, 1], 1 for a real tile) drops the padding tiles of a training batch."""
        if pixel_values is not None and visual_features is not None:
            raise ValueError("Pass pixel_values or visual_features, not both")
        if visual_features is not None:
            features = self.project_visual_features(visual_features)
        else:
            features = self.extract_feature(pixel_values)
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
        return embeddings(input_ids.to(execution_device(embeddings)))

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
        statistics: Any = None,
        loss_weight: Any = None,
        loss_reduction_all_gather: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (and, with `labels`, the shifted next-token loss, -100 ignored) of the decoder over `input_ids`,
        whose `<|vision_pad|>` embeddings are replaced by the features of `pixel_values` (or `visual_features`),
        one tile's 256 features per 256 pad tokens, in order. Works without images (text only) and without
        torch.distributed. The argument order is the reference's (InternVL training code passes keywords).

        Training: `image_flags` (1 per real tile, 0 per padding tile) drops the tiles a collator added so that the
        vision tower runs in every step. In training mode, or with `labels`, `use_cache` defaults to False: a KV
        cache would stop transformers from recognising packed rows (several examples in one row, `position_ids`
        restarting at 0 and no `attention_mask`), whose examples must not attend to each other. `loss_weight`
        (InternVL's per-token weights, shaped like `labels`) makes the loss the weighted mean of the per-token
        losses, sum(w * loss) / sum(w), over the shifted positions. InternVL's `statistics` (packed-batch logging)
        and `loss_reduction_all_gather` (a collective inside forward) are refused with an error rather than
        ignored.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if statistics is not None:
            raise ValueError(
                "statistics is InternVL's logging of packed batches; NVLM-D does not use it: leave it out of the batch"
            )
        if loss_reduction_all_gather:
            raise ValueError(
                "loss_reduction_all_gather would need a collective inside forward, which NVLM-D does not do: average "
                "the loss weights across ranks in the data pipeline instead"
            )
        if loss_weight is not None and labels is None:
            raise ValueError("loss_weight weighs the loss of labels: pass labels too")
        if use_cache is None and (self.training or labels is not None):
            use_cache = False
        if use_cache and attention_mask is None and _restarts_positions(position_ids):
            raise ValueError(
                "position_ids restart inside a row (packed examples) and use_cache=True: a KV cache stops transformers "
                "from isolating the examples' attention; pass use_cache=False"
            )
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids)
        if (pixel_values is not None or visual_features is not None) and not self._images_are_cached(input_ids, cache):
            if input_ids is None:
                raise ValueError("Images need input_ids, to find the <|vision_pad|> positions their features replace")
            image_features = self._image_features(pixel_values, visual_features, image_flags)
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels if loss_weight is None else None,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        if loss_weight is not None:
            outputs.loss = _weighted_loss(outputs.logits, labels, loss_weight)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return outputs if return_dict else outputs.to_tuple()

    def _images_are_cached(self, input_ids: torch.LongTensor | None, cache: Any | None) -> bool:
        """Whether the images were read into `cache` already: generation continued from a cache (a later call of
        assisted decoding's draft model, a follow-up turn) passes them again with only the uncached tokens."""
        if input_ids is None or cache is None or cache.get_seq_length() == 0:
            return False
        return not bool((input_ids == self.img_context_token_id).any())

    def prepare_inputs_for_generation(
        self,
        *args,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        """transformers' preparation, which passes `pixel_values` at prefill only; `visual_features` and
        `image_flags` likewise (later steps read the image through the KV cache). `inputs_embeds` is named in the
        signature because `generate` looks for it there before it accepts `generate(inputs_embeds=...)`."""
        inputs = super().prepare_inputs_for_generation(
            *args, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )
        if not is_first_iteration and kwargs.get("use_cache", True):
            inputs.pop("visual_features", None)
            inputs.pop("image_flags", None)
        return inputs

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ) -> tuple[torch.LongTensor | None, dict[str, Any]]:
        """transformers' expansion for beams and `num_return_sequences`, which repeats every tensor row by row: right
        for inputs with one row per prompt, wrong for the images, which have one row per tile. `[t0, t1]` of a 2-tile
        prompt would become `[t0, t0, t1, t1]`, and each copy of the prompt would read another copy's tiles. Here each
        prompt's tiles are repeated as one group (`[t0, t1, t0, t1]`), so that every copy reads its own, in order."""
        images = {name: model_kwargs.pop(name) for name in _PER_TILE_INPUTS if model_kwargs.get(name) is not None}
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if images and expand_size > 1:
            if input_ids is None:
                raise ValueError("Images need input_ids, to find the <|vision_pad|> positions their features replace")
            cache = model_kwargs.get("cache")
            uncached = input_ids[:, cache.get_seq_length() :] if cache is not None else input_ids
            images = self._repeat_tiles_per_prompt(uncached, images, expand_size)
        model_kwargs.update(images)
        return expanded_ids, model_kwargs

    def _repeat_tiles_per_prompt(
        self, input_ids: torch.LongTensor, images: dict[str, torch.Tensor], expand_size: int
    ) -> dict[str, torch.Tensor]:
        """`images` (per-tile tensors) with each prompt's tiles repeated `expand_size` times as a group. A prompt's
        tiles are as many as its `<|vision_pad|>` tokens make tiles; `image_flags` first drops the padding tiles
        (flag 0), which belong to no prompt, so the expanded images need no flags."""
        flags = images.pop("image_flags", None)
        if flags is not None:
            real = flags.reshape(-1) == 1
            for name, tiles in images.items():
                if real.shape[0] != tiles.shape[0]:
                    raise ValueError(f"image_flags has {real.shape[0]} entries but there are {tiles.shape[0]} tiles")
                images[name] = tiles[real.to(tiles.device)]
        tokens = (input_ids == self.img_context_token_id).sum(dim=1).tolist()
        if any(count % self.num_image_token for count in tokens):
            raise ValueError(
                f"Each prompt's image tokens (id {self.img_context_token_id}) must be whole tiles of "
                f"{self.num_image_token}; the prompts have {tokens}"
            )
        tiles_per_prompt = [count // self.num_image_token for count in tokens]
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

    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor | Any:
        """transformers' `generate` on a prompt and its images; returns the NEW tokens only (the reference's
        contract, which its clients rely on: do not slice the prompt off), also inside a `return_dict_in_generate`
        output's `sequences`.

        `input_ids` and `attention_mask` may live on any device (they go to the embeddings' device); without an
        `attention_mask`, left padding (`<|endoftext|>`) is recognised, as in transformers' text models. Every
        `generate` keyword works: sampling, beams, `num_return_sequences`, `assistant_model`, stop strings,
        streamers, `cache_implementation="static"`, `compile_config`, logits processors. With beams or several
        return sequences, every copy of a prompt reads that prompt's tiles.

        Instead of `input_ids`, `inputs_embeds` [batch, tokens, hidden] may hold the prompt's embeddings with any image
        features already merged in (then pass no images).

        One caller gets whole sequences (prompt and new tokens): transformers' `pipeline("text-generation")`, which
        cuts the prompt's length off what `generate` returns, as for every causal LM; given the new tokens only, it
        would answer with empty strings.
        """
        if input_ids is None:
            if "inputs_embeds" not in generate_kwargs:
                raise ValueError("generate needs input_ids (or inputs_embeds)")
            if pixel_values is not None or visual_features is not None:
                raise ValueError("Pass images with input_ids, not with inputs_embeds (their features are merged in)")
            return super().generate(
                attention_mask=attention_mask, generation_config=generation_config, **generate_kwargs
            )
        if generate_kwargs.get("assistant_model") is not None:
            generate_kwargs["assistant_model"] = _DraftModel(generate_kwargs["assistant_model"])
        input_ids = self._check_input_ids(input_ids).to(execution_device(self.get_input_embeddings()))
        if attention_mask is not None:
            attention_mask = attention_mask.to(input_ids.device)
        cache = generate_kwargs.get("cache", generate_kwargs.get("past_key_values"))
        uncached = input_ids[:, cache.get_seq_length() :] if cache is not None else input_ids
        if pixel_values is None and visual_features is None and bool((uncached == self.img_context_token_id).any()):
            raise ValueError(
                f"The prompt has image tokens (id {self.img_context_token_id}) but no pixel_values were given"
            )
        outputs = super().generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            visual_features=visual_features,
            generation_config=generation_config,
            **generate_kwargs,
        )
        prompt_length = 0 if _called_by_text_generation_pipeline() else input_ids.shape[1]
        if isinstance(outputs, torch.Tensor):
            return outputs[:, prompt_length:]
        outputs.sequences = outputs.sequences[:, prompt_length:]
        return outputs

    @staticmethod
    def _check_input_ids(input_ids: Any) -> torch.LongTensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int):
            raise TypeError(
                f"input_ids must be an integer torch.Tensor, got {getattr(input_ids, 'dtype', type(input_ids))}"
            )
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [batch, prompt_length > 0], got {list(input_ids.shape)}")
        return input_ids


NVLM_D_Model.register_for_auto_class("AutoModel")
