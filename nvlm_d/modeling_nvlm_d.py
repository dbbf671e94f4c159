"""NVLM-D: InternViT-6B tiles -> pixel shuffle -> `mlp1` -> Qwen2 decoder, whose `<|vision_pad|>` embeddings are
replaced by the image features.

The image features enter in `forward`, as in transformers' own InternVL: `forward(input_ids, pixel_values, ...)`
embeds the prompt and scatters one image token into every `<|vision_pad|>` position. `generate` is transformers'
own loop (`prepare_inputs_for_generation` passes the images at prefill only), so every decoding feature works:
sampling, beams, assisted decoding, stop strings, streamers, static caches, `torch.compile`. Nothing here assumes a
device: inputs go where the module that reads them executes, so any accelerate device map (GPUs, CPU, disk) works.

The model card's chat API (`chat`, `batch_chat`, `start_chat`, ...) comes from `chat_nvlm_d.NVLMChatMixin` and
InternVL's LoRA helpers (`wrap_llm_lora`, `wrap_backbone_lora`) from `lora_nvlm_d.NVLMLoraMixin`: base classes of
`NVLM_D_Model`. Input checks live in `model_inputs`, and the adapters of the `generate` contract (new tokens only;
draft models; tiles repeated per prompt) in `generation_nvlm_d`. None of these modules imports this one.
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
from .generation_nvlm_d import (
    PER_TILE_INPUTS,
    DraftModel,
    called_by_text_generation_pipeline,
    drop_prompt,
    repeat_tiles_per_prompt,
)
from .lora_nvlm_d import NVLMLoraMixin
from .model_inputs import (
    check_forward_inputs,
    check_generate_inputs,
    check_packed_rows_uncached,
    check_pixel_values,
    check_training_inputs,
    check_vision_batch_size,
    check_visual_features,
    execution_device,
    real_tiles,
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


class NVLMProjector(nn.Sequential):
    """`mlp1`: LayerNorm -> Linear -> GELU -> Linear, from the pixel-shuffled ViT width (4 x 3200) through the
    decoder's intermediate size to its hidden size. A `Sequential`: the checkpoint names its weights `mlp1.0` ..."""

    def __init__(self, config: NVLM_D_Config) -> None:
        vit_hidden = config.vision_config.hidden_size * round(1 / config.downsample_ratio) ** 2
        llm = config.llm_config
        super().__init__(
            nn.LayerNorm(vit_hidden),
            nn.Linear(vit_hidden, llm.intermediate_size, bias=False),
            nn.GELU(),
            nn.Linear(llm.intermediate_size, llm.hidden_size, bias=False),
        )


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
        check_vision_batch_size(vision_batch_size)
        _apply_use_flash_attn(config, use_flash_attn)
        super().__init__(config)
        self.vision_batch_size = vision_batch_size
        # In the order data flows through them: accelerate fills devices in this order, so the vision tower and the
        # projector land beside the decoder's embeddings.
        self.vision_model = vision_model if vision_model is not None else InternVisionModel(config.vision_config)
        self.mlp1 = NVLMProjector(config)
        self.language_model = language_model if language_model is not None else Qwen2ForCausalLM(config.llm_config)
        self.post_init()
        self._wrap_saved_lora()
        if self.generation_config.pad_token_id is None:
            # Qwen2's tokenizer pads with <|endoftext|>, the id the decoder config calls bos_token_id; knowing it,
            # `generate` infers the attention mask of left-padded input_ids passed without one.
            llm = config.llm_config
            self.generation_config.pad_token_id = llm.pad_token_id if llm.pad_token_id is not None else llm.bos_token_id

    @property
    def num_image_token(self) -> int:
        """Decoder tokens per tile (256)."""
        return self.config.num_image_token

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

    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        """[tiles, rows, cols, c] -> [tiles, rows * s, cols * s, c / s^2]: each output cell concatenates a
        1/s x 1/s block of input cells (for s = 0.5, in the order top-left, top-right, bottom-left, bottom-right).
        `ps_version` v2 keeps the row-major grid; v1 (the original InternVL order) leaves it transposed."""
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
        """Checked pixel values -> (ViT hidden state, visual features), `vision_batch_size` tiles at a time (each
        chunk's intermediates freed before the next)."""
        pixel_values = check_pixel_values(pixel_values, self.config)
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        pixel_values = pixel_values.to(device=execution_device(self.vision_model), dtype=dtype)
        parts = [self._encode_tiles(part) for part in pixel_values.split(self.vision_batch_size or len(pixel_values))]
        if len(parts) == 1:  # all tiles at once: no copy through torch.cat
            return parts[0]
        return torch.cat([hidden for hidden, _ in parts]), torch.cat([features for _, features in parts])

    def get_visual_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, 448, 448] -> the pixel-shuffled ViT outputs [tiles, 256, 12800] that `chat(visual_features=...)`,
        `generate` and `forward` accept in place of `pixel_values` (the projector `mlp1` still runs on them): encode
        an image once to ask several questions about it, or to cache its features on disk."""
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
        """The reference's name: [tiles, 3, 448, 448] (any float dtype and device) -> image features
        [tiles, 256, llm hidden size]."""
        return self.project_visual_features(self.get_visual_features(pixel_values))

    def merge_image_features(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Replace the embedding of every `<|vision_pad|>` position, in order, by one image token; a ValueError when
        their numbers differ."""
        mask = input_ids == self.img_context_token_id
        image_tokens = image_features.reshape(-1, image_features.shape[-1])
        if int(mask.sum()) != image_tokens.shape[0]:
            raise ValueError(
                f"The prompt has {int(mask.sum())} image tokens (id {self.img_context_token_id}) but the images give "
                f"{image_tokens.shape[0]} features ({image_features.shape[0]} tiles x {self.num_image_token}); "
                "build the prompt with the same num_patches_list as the pixel_values."
            )
        mask = mask.unsqueeze(-1).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(mask, image_tokens.to(inputs_embeds.device, inputs_embeds.dtype))

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
        restarting at 0 and no `attention_mask`). `loss_weight` (InternVL's per-token weights, shaped like `labels`)
        makes the loss sum(w * loss) / sum(w) over the shifted positions. InternVL's `statistics` and
        `loss_reduction_all_gather` are refused with an error rather than ignored.
        """
        has_images = pixel_values is not None or visual_features is not None
        check_forward_inputs(input_ids, inputs_embeds, pixel_values, visual_features)
        check_training_inputs(labels, loss_weight, statistics, loss_reduction_all_gather)
        if use_cache is None and (self.training or labels is not None):
            use_cache = False
        check_packed_rows_uncached(use_cache, attention_mask, position_ids)
        if inputs_embeds is None:
            embeddings = self.get_input_embeddings()
            inputs_embeds = embeddings(input_ids.to(execution_device(embeddings)))
        if has_images and not self._images_are_cached(input_ids, cache):
            if visual_features is None:
                visual_features = self.get_visual_features(pixel_values)
            image_features = real_tiles(self.project_visual_features(visual_features), image_flags)
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

    def _images_are_cached(self, input_ids: torch.LongTensor, cache: Any | None) -> bool:
        """Whether the images were read into `cache` already: generation continued from a cache (a later call of
        assisted decoding's draft model, a follow-up turn) passes them again with only the uncached tokens."""
        if cache is None or cache.get_seq_length() == 0:
            return False
        return not bool((input_ids == self.img_context_token_id).any())

    def prepare_inputs_for_generation(
        self, *args, inputs_embeds: torch.Tensor | None = None, is_first_iteration: bool | None = False, **kwargs
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
        **kwargs,
    ) -> tuple[torch.LongTensor | None, dict[str, Any]]:
        """transformers' expansion for beams and `num_return_sequences`, which repeats tensors row by row: right for
        inputs with one row per prompt; the images, whose rows are tiles, go a prompt's tiles at a time."""
        images = {name: kwargs.pop(name) for name in PER_TILE_INPUTS if kwargs.get(name) is not None}
        expanded_ids, kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **kwargs
        )
        if images and expand_size > 1:
            images = repeat_tiles_per_prompt(input_ids, kwargs.get("cache"), images, expand_size, self.config)
        return expanded_ids, {**kwargs, **images}

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

        `input_ids` and `attention_mask` may live on any device; without an `attention_mask`, left padding
        (`<|endoftext|>`) is recognised. Every `generate` keyword works (sampling, beams, `num_return_sequences`,
        `assistant_model`, stop strings, streamers, static caches, `compile_config`, logits processors); every copy
        of a prompt reads that prompt's tiles. `inputs_embeds` [batch, tokens, hidden] may replace `input_ids`, with
        any image features already merged in. transformers' `pipeline("text-generation")`, which cuts the prompt off
        itself, gets whole sequences (see `generation_nvlm_d`).
        """
        check_generate_inputs(input_ids, pixel_values, visual_features, generate_kwargs, self.img_context_token_id)
        if input_ids is None:
            return super().generate(
                attention_mask=attention_mask, generation_config=generation_config, **generate_kwargs
            )
        if generate_kwargs.get("assistant_model") is not None:
            assistant = generate_kwargs["assistant_model"]
            generate_kwargs["assistant_model"] = DraftModel(assistant, reads_images=isinstance(assistant, NVLM_D_Model))
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(input_ids.device) if attention_mask is not None else None
        outputs = super().generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            visual_features=visual_features,
            generation_config=generation_config,
            **generate_kwargs,
        )
        whole_sequences = called_by_text_generation_pipeline(sys._getframe(1))
        return drop_prompt(outputs, 0 if whole_sequences else input_ids.shape[1])


NVLM_D_Model.register_for_auto_class("AutoModel")
