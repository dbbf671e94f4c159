"""NVLM-D: InternViT-6B tiles -> pixel shuffle -> `mlp1` -> Qwen2 decoder, whose `<|vision_pad|>` embeddings are
replaced by the image features.

The image features enter in `forward`, as in transformers' own InternVL: `forward(input_ids, pixel_values, ...)`
embeds the prompt and scatters one image token into every `<|vision_pad|>` position. `generate` is transformers'
own loop (`prepare_inputs_for_generation` passes the images at prefill only), so every decoding feature works:
sampling, beams, assisted decoding, stop strings, streamers, static caches, `torch.compile`. Nothing here assumes a
device: inputs go where the module that reads them executes, so any accelerate device map (GPUs, CPU, disk) works.
"""

from __future__ import annotations

import copy
import itertools
import operator
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig, GenerationMixin, PreTrainedModel, Qwen2ForCausalLM
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.utils import is_flash_attn_2_available, logging
from transformers.utils.deprecation import deprecate_kwarg

from .chat_session import ChatSession
from .configuration_nvlm_d import NVLM_D_Config
from .conversation import IM_END_TOKEN, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, build_prompt, get_conv_template
from .modeling_intern_vit import InternVisionModel

logger = logging.get_logger(__name__)

# The layers InternVL's LoRA helpers adapt (peft `target_modules`, matched as name suffixes): every linear layer of
# the decoder's blocks, and of the ViT's blocks.
LLM_LORA_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
VISION_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")

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


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: accelerate's execution device when a device map placed or offloaded it (its weights
    may then be on `meta`), else the device of its first real parameter."""
    for submodule in module.modules():
        hook = getattr(submodule, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):  # lazily: often the first one answers
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


class _GeneratedTokensOnly(LogitsProcessor):
    """Runs `processor` on the generated tokens alone, not on the prompt that precedes them in `input_ids`."""

    def __init__(self, processor: LogitsProcessor, prompt_length: int) -> None:
        self.processor = processor
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.processor(input_ids[:, self.prompt_length :], scores)


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


def _on_generated_tokens_only(config: GenerationConfig, prompt_length: int) -> LogitsProcessorList:
    """Moves `repetition_penalty` and `no_repeat_ngram_size` out of `config` (in place) into processors that see the
    generated tokens only, as in the reference, whose generation started from the prompt's embeddings."""
    from transformers.generation import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(
            RepetitionPenaltyLogitsProcessor(config.repetition_penalty, prompt_ignore_length=prompt_length)
        )
    if config.no_repeat_ngram_size:
        processors.append(
            _GeneratedTokensOnly(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size), prompt_length)
        )
    config.repetition_penalty = None
    config.no_repeat_ngram_size = None
    return processors


def _wrap_with_lora(
    module: nn.Module, r: int, lora_alpha: int, lora_dropout: float, targets: Sequence[str], task_type: str | None
) -> nn.Module:
    """`module` inside a peft `PeftModel` with LoRA adapters of rank `r` on `targets` (peft is needed only here)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError(
            "LoRA needs peft: pip install peft (or, in a clone of this repository, pip install -e '.[train]')"
        ) from None
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(targets), task_type=task_type
    )
    # peft's new dropout layers start in training mode; keep the mode the module was in (eval after loading)
    return get_peft_model(module, config).train(module.training)


def _record_lora_settings(
    config: NVLM_D_Config, tower: str, r: int, lora_alpha: float, lora_dropout: float, targets: Sequence[str]
) -> None:
    """Write a wrapped tower's LoRA settings into `config` (`use_{tower}_lora` and its companions)."""
    setattr(config, f"use_{tower}_lora", r)
    setattr(config, f"{tower}_lora_alpha", lora_alpha)
    setattr(config, f"{tower}_lora_dropout", lora_dropout)
    setattr(config, f"{tower}_lora_target_modules", list(targets))


def _saved_lora_settings(config: NVLM_D_Config, tower: str) -> dict[str, Any]:
    """The `wrap_{tower}_lora` arguments that rebuild the adapters `config` records; where a checkpoint predates
    the companions of `use_{tower}_lora` (InternVL's own), InternVL's convention: alpha 2r, dropout 0.05."""
    r = getattr(config, f"use_{tower}_lora")
    alpha = getattr(config, f"{tower}_lora_alpha", None)
    dropout = getattr(config, f"{tower}_lora_dropout", None)
    targets = getattr(config, f"{tower}_lora_target_modules", None)
    settings: dict[str, Any] = {
        "r": r,
        "lora_alpha": 2 * r if alpha is None else alpha,
        "lora_dropout": 0.05 if dropout is None else dropout,
    }
    if targets is not None:
        settings["target_modules"] = targets
    return settings


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


def _chat_generation_config(settings: dict | GenerationConfig | None, tokenizer: Any) -> tuple[GenerationConfig, dict]:
    """`chat`'s `generation_config` (never modified) as a fresh GenerationConfig and the other `generate` keywords a
    dict may hold (`assistant_model`, `logits_processor`, ...). Where the caller names none, generation stops at
    `<|im_end|>` and pads with the tokenizer's pad token."""
    extra: dict = {}
    if settings is None:
        config = GenerationConfig()
    elif isinstance(settings, GenerationConfig):
        config = copy.deepcopy(settings)
    elif isinstance(settings, dict):
        config = GenerationConfig()
        extra = config.update(**settings)
    else:
        raise TypeError(f"generation_config must be a dict or a GenerationConfig, got {type(settings).__name__}")
    _refuse_sampling_without_do_sample(config)
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END_TOKEN)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config, extra


def _called_by_text_generation_pipeline() -> bool:
    """Whether the caller of `NVLM_D_Model.generate` (two frames up from here) is transformers' text-generation
    pipeline. Looked up in `sys.modules` only: a process that never loaded the pipeline does not import it."""
    pipelines = sys.modules.get("transformers.pipelines.text_generation")
    if pipelines is None:
        return False
    caller = sys._getframe(2).f_locals.get("self")
    return isinstance(caller, pipelines.TextGenerationPipeline)


def _settings_streamer(extra: dict, streamer: Any) -> Any:
    """The streamer to generate with: `streamer`, or the one the generation settings dict held (popped from `extra`,
    which goes to `generate` as keywords beside `streamer=`, where two values for one keyword would collide)."""
    in_settings = extra.pop("streamer", None)
    if streamer is not None and in_settings is not None and streamer is not in_settings:
        raise ValueError("Two streamers were given, one as streamer= and one in the generation settings: pass one")
    return streamer if streamer is not None else in_settings


# Settings that act only when sampling (do_sample=True); `generate` ignores them otherwise.
SAMPLING_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def _refuse_sampling_without_do_sample(config: GenerationConfig) -> None:
    """Sampling settings with `do_sample` left unset are an error, not a greedy answer with a log line: the caller
    most likely meant to sample. An explicit `do_sample=False` keeps them ignored, as `generate` does (evaluation
    harnesses pass `temperature=0` that way)."""
    if config.do_sample is not None:
        return
    given = [name for name in SAMPLING_SETTINGS if getattr(config, name, None) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} only act when sampling, and do_sample is not set (generation would be greedy): "
            "add do_sample=True to sample, or do_sample=False to answer greedily"
        )


def _positive_counts(name: str, counts: Any, allow_zero: bool = False) -> list[int]:
    """`counts` as a list of Python ints (numpy and torch integers accepted), each >= 1 (or >= 0)."""
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence):
        raise TypeError(f"{name} must be a list of tile counts, got {counts!r}")
    values = []
    for count in counts:
        if isinstance(count, bool):
            raise TypeError(f"{name} must hold tile counts (ints), got {counts!r}")
        try:
            value = operator.index(count)
        except TypeError:
            raise TypeError(f"{name} must hold tile counts (ints), got {counts!r}") from None
        if value < (0 if allow_zero else 1):
            raise ValueError(f"{name} must hold tile counts >= {0 if allow_zero else 1}, got {counts!r}")
        values.append(value)
    return values


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
        self.vision_batch_size = vision_batch_size
        # `chat`'s system prompt (the template's, "Answer the questions."); assign to change it, as in InternVL.
        self.system_message = get_conv_template(config.template).system_message

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
        # An unmerged InternVL-style LoRA checkpoint: build the adapters its weights belong to, with the settings they
        # were saved with, so that `from_pretrained` loads them instead of leaving them randomly initialised.
        if config.use_backbone_lora:
            self.wrap_backbone_lora(**_saved_lora_settings(config, "backbone"))
        if config.use_llm_lora:
            self.wrap_llm_lora(**_saved_lora_settings(config, "llm"))
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

    # ----------------------------------------------------------------------------------------------------------
    # InternVL's LoRA helpers
    # ----------------------------------------------------------------------------------------------------------
    def wrap_backbone_lora(
        self,
        r: int = 128,
        lora_alpha: float = 256,
        lora_dropout: float = 0.05,
        target_modules: Sequence[str] = VISION_LORA_TARGETS,
    ) -> None:
        """InternVL's helper: LoRA adapters (peft) on the ViT's `attn.qkv`, `attn.proj`, `mlp.fc1` and `mlp.fc2`;
        everything else in the tower is frozen. Records the adapters' settings in the config (`use_backbone_lora = r`,
        `backbone_lora_alpha`, `..._dropout`, `..._target_modules`), so that a checkpoint saved without merging
        (`save_pretrained`) reloads with the same adapters. Merge with `nvlm_d.training.merge_lora` for a plain
        checkpoint."""
        self.vision_model = _wrap_with_lora(self.vision_model, r, lora_alpha, lora_dropout, target_modules, None)
        _record_lora_settings(self.config, "backbone", r, lora_alpha, lora_dropout, target_modules)

    def wrap_llm_lora(
        self,
        r: int = 128,
        lora_alpha: float = 256,
        lora_dropout: float = 0.05,
        target_modules: Sequence[str] = LLM_LORA_TARGETS,
    ) -> None:
        """InternVL's helper: LoRA adapters (peft, `CAUSAL_LM`) on every linear layer of the decoder's blocks
        (`q/k/v/o_proj`, `gate/up/down_proj`); the rest of the decoder is frozen. Records the adapters' settings in
        the config (`use_llm_lora = r`, `llm_lora_alpha`, ...; see `wrap_backbone_lora`)."""
        self.language_model = _wrap_with_lora(
            self.language_model, r, lora_alpha, lora_dropout, target_modules, "CAUSAL_LM"
        )
        self.language_model.enable_input_require_grads()
        _record_lora_settings(self.config, "llm", r, lora_alpha, lora_dropout, target_modules)

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
        pixel_values = self._check_pixel_values(pixel_values)
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
        visual_features = self._check_visual_features(visual_features)
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
        width = self.config.vision_config.hidden_size * round(1 / self.config.downsample_ratio) ** 2
        expected = f"[num_tiles, {self.num_image_token}, {width}]"
        if not isinstance(visual_features, torch.Tensor):
            raise TypeError(
                f"visual_features must be a torch.Tensor of shape {expected}, got {type(visual_features).__name__}"
            )
        shape = tuple(visual_features.shape)
        if len(shape) != 3 or shape[0] == 0 or shape[1:] != (self.num_image_token, width):
            raise ValueError(
                f"visual_features must have shape {expected} (pixel-shuffled ViT outputs, see get_visual_features), "
                f"got {list(shape)}"
            )
        return visual_features

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

    # ----------------------------------------------------------------------------------------------------------
    # Chat (the reference API)
    # ----------------------------------------------------------------------------------------------------------
    def _num_tiles(self, pixel_values: torch.Tensor | None, visual_features: torch.Tensor | None) -> int:
        if pixel_values is not None and visual_features is not None:
            raise ValueError("Pass pixel_values or visual_features, not both")
        if visual_features is not None:
            return self._check_visual_features(visual_features).shape[0]
        if pixel_values is not None:
            return self._check_pixel_values(pixel_values).shape[0]
        return 0

    @staticmethod
    def _check_question(question: Any) -> None:
        """A question is a string with some text: an empty one gets an error, as in `nvlm-d chat` and `nvlm-d batch`
        (NVLM-D would answer the bare system prompt, or describe the image unasked)."""
        if not isinstance(question, str):
            raise TypeError(f"a question must be a string, got {type(question).__name__}")
        if not question.strip():
            raise ValueError(f"the question is empty ({question!r}): ask something, e.g. 'Describe the image.'")

    @staticmethod
    def _check_num_patches(num_patches_list: Any, num_tiles: int) -> list[int]:
        if num_patches_list is None:
            return [num_tiles] if num_tiles else []
        counts = _positive_counts("num_patches_list", num_patches_list)
        if sum(counts) != num_tiles:
            raise ValueError(f"num_patches_list sums to {sum(counts)} tiles but pixel_values holds {num_tiles} tiles")
        return counts

    def chat_prompt(
        self,
        question: str,
        num_patches_list: Sequence[int] = (),
        history: Sequence[tuple[str, str]] | None = None,
        mode: str = "chat",
        context_token: str = IMG_CONTEXT_TOKEN,
    ) -> str:
        """The exact prompt text `chat` sends for this question: `conversation.build_prompt` with this model's
        template, system message (`self.system_message`) and image tokens per tile."""
        return build_prompt(
            question,
            num_patches_list,
            history,
            template=self.template,
            system_message=self.system_message,
            num_image_token=self.num_image_token,
            context_token=context_token,
            mode=mode,
        )

    def _chat_image_token(self, tokenizer: Any, image_context_token: str) -> None:
        token_id = tokenizer.convert_tokens_to_ids(image_context_token)
        if token_id != self.img_context_token_id:
            raise ValueError(
                f"IMG_CONTEXT_TOKEN={image_context_token!r} is token id {token_id}, but NVLM-D's image features "
                f"replace id {self.img_context_token_id} (<|vision_pad|>, config.image_token_id)"
            )

    def _generate_text(
        self,
        tokenizer: Any,
        prompts: list[str],
        generation_config: dict | GenerationConfig | None,
        pixel_values: torch.Tensor | None,
        visual_features: torch.Tensor | None,
        streamer: Any = None,
    ) -> list[list[str]]:
        """Tokenize prompts (left-padded when several), generate until `<|im_end|>`, decode and strip; returns the
        answers of each prompt (one, or `num_return_sequences`)."""
        rows = [tokenizer(p, return_tensors="pt").input_ids[0] for p in prompts]
        input_ids, attention_mask = _left_pad(rows, tokenizer.pad_token_id)
        config, extra = _chat_generation_config(generation_config, tokenizer)
        streamer = _settings_streamer(extra, streamer)
        if _prefill_rows_apart(rows, config, extra):
            extra["cache"] = self._prefill_each_row(rows, pixel_values, visual_features)
            pixel_values = visual_features = None
        history_processors = _on_generated_tokens_only(config, input_ids.shape[1])
        extra["logits_processor"] = LogitsProcessorList([*extra.get("logits_processor", []), *history_processors])
        extra.setdefault("tokenizer", tokenizer)
        output_ids = self.generate(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            visual_features=visual_features,
            generation_config=config,
            streamer=streamer,
            **extra,
        )
        sequences = output_ids if isinstance(output_ids, torch.Tensor) else output_ids.sequences
        texts = [
            text.split(IM_END_TOKEN)[0].strip() for text in tokenizer.batch_decode(sequences, skip_special_tokens=True)
        ]
        per_prompt = len(texts) // len(prompts)
        return [texts[k * per_prompt : (k + 1) * per_prompt] for k in range(len(prompts))]

    @torch.no_grad()
    def _prefill_each_row(
        self, rows: list[torch.Tensor], pixel_values: torch.Tensor | None, visual_features: torch.Tensor | None
    ) -> DynamicCache:
        """The KV cache of every prompt but its last token, each prompt run alone, stacked left-padded into the cache
        of one batch; `generate` then runs the last tokens together and decodes the batch.

        A left-padded prefill attends through an explicit mask, over every row padded to the longest: in a batch of
        1- to 13-tile prompts it cost 3x the rows' prefills run one by one (SDPA on CPU; see
        docs/benchmarks.md). Run apart, each row's prefill is the causal one `chat` runs; so is its vision tower
        pass (all the batch's tiles at once, 80 of them, ran 1.2-1.5x slower per tile on CPU)."""
        tiles = [int((row == self.img_context_token_id).sum()) // self.num_image_token for row in rows]
        images = pixel_values if pixel_values is not None else visual_features
        per_row = images.split(tiles) if images is not None else [None] * len(rows)
        device = execution_device(self.get_input_embeddings())
        caches = []
        for row, row_images in zip(rows, per_row, strict=True):
            cache = DynamicCache()
            has_images = row_images is not None and len(row_images) > 0
            self(
                input_ids=row[None, :-1].to(device),
                pixel_values=row_images if has_images and pixel_values is not None else None,
                visual_features=row_images if has_images and pixel_values is None else None,
                cache=cache,
                logits_to_keep=1,
            )
            caches.append(cache)
        return _stack_left_padded(caches, max(len(row) for row in rows) - 1)

    def _explain_placeholder_mismatch(
        self, error: ValueError, question: str, added_placeholder: bool, history: Any, num_images: int
    ) -> ValueError:
        """`build_prompt`'s placeholder error, reworded for what the caller of `chat` did."""
        in_history = sum(turn[0].count(IMAGE_PLACEHOLDER) for turn in history or [])
        if added_placeholder:
            return ValueError(
                f"chat put one {IMAGE_PLACEHOLDER} in front of the question (it had none) but {num_images} images "
                f"were given: put one {IMAGE_PLACEHOLDER} per image in the question, e.g. "
                f"'Image-1: {IMAGE_PLACEHOLDER}\\nImage-2: {IMAGE_PLACEHOLDER}\\n{question}'"
            )
        if in_history and num_images == 0:
            return ValueError(
                f"the history holds {in_history} {IMAGE_PLACEHOLDER} placeholder(s) from earlier turns: pass the same "
                "pixel_values (and num_patches_list) as in those turns again, since every turn re-reads its images"
            )
        return error

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
        *,
        prompt_mode: str = "chat",
    ) -> str | list[str] | tuple[str, list[tuple[str, str]]]:
        """Answer `question` about the images in `pixel_values` (None for text only), as NVLM-D's reference does.

        Args:
            tokenizer: the model's tokenizer.
            pixel_values: [tiles, 3, 448, 448] from `load_image` (any float dtype and device), or None.
            question: the user's turn, not empty; `<image>` marks where each image goes (`<image>\\n` is put in
                front when there are images, no history and no placeholder).
            generation_config: dict (or GenerationConfig) of generation settings, e.g.
                `dict(max_new_tokens=1024, do_sample=False)`; not modified. Generation stops at `<|im_end|>` unless
                it names its own `eos_token_id`. As in the reference, `repetition_penalty` and
                `no_repeat_ngram_size` look at the generated tokens only, not at the prompt. Sampling settings
                (`temperature`, `top_p`, `top_k`, ...) without `do_sample` raise ValueError: set `do_sample`.
            history: earlier (question, answer) pairs; not modified. Their `<image>` placeholders are expanded again
                from `pixel_values`, so pass the same images on every turn.
            return_history: also return the history with this turn appended.
            num_patches_list: tiles per image when `pixel_values` stacks several images.
            IMG_START_TOKEN, IMG_END_TOKEN: accepted for compatibility; NVLM wraps images in `<Image>`
                and `</Image>` text, as the reference does.
            IMG_CONTEXT_TOKEN: the token whose embeddings are replaced by image features (`<|vision_pad|>`).
            verbose: log the prompt (without image tokens) and the response.
            visual_features: precomputed features from `get_visual_features` [tiles, 256, 12800], used instead of
                running the vision tower.
            streamer: a transformers streamer (e.g. `TextIteratorStreamer(tokenizer, skip_prompt=True)`).
            prompt_mode: "chat" (the reference's prompt), "no_system" (no system turn) or "raw" (no template);
                `chat_without_sys_prompt` and `chat_without_chat_prompt` set it.

        Returns:
            The response (stripped), or a list of `num_return_sequences` responses when that setting is above 1;
            with `return_history`, also the new history.
        """
        self._check_question(question)
        num_patches_list = self._check_num_patches(num_patches_list, self._num_tiles(pixel_values, visual_features))
        self._chat_image_token(tokenizer, IMG_CONTEXT_TOKEN)
        added_placeholder = bool(num_patches_list) and history is None and IMAGE_PLACEHOLDER not in question
        if added_placeholder:
            question = IMAGE_PLACEHOLDER + "\n" + question
        try:
            prompt = self.chat_prompt(question, num_patches_list, history, prompt_mode, IMG_CONTEXT_TOKEN)
        except ValueError as error:
            if "placeholder" not in str(error):
                raise
            raise self._explain_placeholder_mismatch(
                error, question, added_placeholder, history, len(num_patches_list)
            ) from None
        if verbose:
            logger.warning(f"NVLM-D prompt (image tokens hidden):\n{prompt.replace(IMG_CONTEXT_TOKEN, '')}")
        (responses,) = self._generate_text(
            tokenizer, [prompt], generation_config, pixel_values, visual_features, streamer
        )
        if verbose:
            logger.warning(f"NVLM-D response: {responses}")
        response: str | list[str] = responses[0] if len(responses) == 1 else responses
        if not return_history:
            return response
        if len(responses) > 1:
            raise ValueError(
                f"return_history needs one answer per turn, but num_return_sequences gave {len(responses)}: "
                "generate without return_history and put the answer you keep into history yourself"
            )
        return response, [*(history or []), (question, response)]

    def chat_without_sys_prompt(self, *args, **kwargs) -> str | list[str] | tuple[str, list[tuple[str, str]]]:
        """`chat` (same arguments) with a prompt that has no system turn:
        `<|im_start|>user\\n...<|im_end|><|im_start|>assistant\\n`.

        (The reference's version cuts the prompt in the middle of its system text; this one builds what its name
        says.)"""
        return self.chat(*args, **kwargs, prompt_mode="no_system")

    def chat_without_chat_prompt(
        self,
        tokenizer: Any,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict | GenerationConfig | None,
        num_patches_list: Sequence[int] | None = None,
        *args,
        **kwargs,
    ) -> str | list[str]:
        """Complete the bare question (placeholders expanded, no conversation template). The arguments are `chat`'s
        without `history` and `return_history`, as in the reference."""
        return self.chat(
            tokenizer,
            pixel_values,
            question,
            generation_config,
            None,
            False,
            num_patches_list,
            *args,
            prompt_mode="raw",
            **kwargs,
        )

    def start_chat(
        self,
        tokenizer: Any,
        generation_config: dict | GenerationConfig | None = None,
        max_tokens: int | None = None,
    ) -> ChatSession:
        """A multi-turn conversation whose follow-up questions reuse the KV cache of the turns before them: each turn
        prefills only its new tokens, and answers as `chat(history=...)` would. See `ChatSession`."""
        return ChatSession(self, tokenizer, generation_config, max_tokens)

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
    ) -> list[str] | list[list[str]]:
        """Answer several single-turn questions in one left-padded batch; each answer equals that of `chat`.

        `num_patches_list` has one entry per question: the tile count of its image (0 for a text-only
        question), or a list of tile counts when it has several images. `pixel_values` stacks every tile in
        question order. Without `num_patches_list`, every question is text only (then `pixel_values` must be
        None) or, when `pixel_values` is given and there is one question, it gets all the tiles.

        Returns one answer per question, or, when `num_return_sequences` is above 1, a list of that many answers per
        question.
        """
        if isinstance(questions, str) or not isinstance(questions, Sequence) or not questions:
            raise TypeError("questions must be a non-empty list of strings")
        num_tiles = self._num_tiles(pixel_values, visual_features)
        per_question = _images_per_question(num_patches_list, len(questions), num_tiles)
        self._chat_image_token(tokenizer, IMG_CONTEXT_TOKEN)
        prompts = []
        for question, tiles in zip(questions, per_question, strict=True):
            self._check_question(question)
            prompts.append(self.chat_prompt(question, tiles, context_token=IMG_CONTEXT_TOKEN))
        if verbose:
            for prompt in prompts:
                logger.warning(f"NVLM-D prompt (image tokens hidden):\n{prompt.replace(IMG_CONTEXT_TOKEN, '')}")
        answers = self._generate_text(tokenizer, prompts, generation_config, pixel_values, visual_features)
        return [group[0] for group in answers] if all(len(group) == 1 for group in answers) else answers


def _images_per_question(
    num_patches_list: Sequence[int | Sequence[int]] | None, num_questions: int, num_tiles: int
) -> list[list[int]]:
    """Normalise batch_chat's `num_patches_list` to a list of tile counts per question."""
    if num_patches_list is None:
        if num_tiles and num_questions != 1:
            raise ValueError(f"pass num_patches_list to say which of the {num_tiles} tiles belong to which question")
        return [[num_tiles] if num_tiles else []] * num_questions
    if isinstance(num_patches_list, (str, bytes)) or not isinstance(num_patches_list, Sequence):
        raise TypeError(f"num_patches_list must be a list with one entry per question, got {num_patches_list!r}")
    if len(num_patches_list) != num_questions:
        raise ValueError(
            f"num_patches_list must have one entry per question ({num_questions}), got {num_patches_list!r}"
        )
    per_question = []
    for entry in num_patches_list:
        counts = [entry] if not isinstance(entry, Sequence) else entry
        per_question.append([n for n in _positive_counts("num_patches_list", counts, allow_zero=True) if n > 0])
    total = sum(sum(counts) for counts in per_question)
    if total != num_tiles:
        raise ValueError(f"num_patches_list sums to {total} tiles but pixel_values holds {num_tiles} tiles")
    return per_question


def _prefill_rows_apart(rows: list[torch.Tensor], config: GenerationConfig, extra: dict) -> bool:
    """Whether a batch's prompts are prefilled one by one (`_prefill_each_row`): when they differ in length, and
    generation keeps one row per prompt in a dynamic cache (beams, several sequences per prompt, a static cache,
    assisted decoding or a cache of the caller's prefill the padded batch). Without a cache (`use_cache=False`) every
    step reruns the whole sequence, so there is no prefill to run apart."""
    return (
        len({len(row) for row in rows}) > 1
        and config.use_cache is not False
        and (config.num_beams or 1) == 1
        and (config.num_return_sequences or 1) == 1
        and config.cache_implementation is None
        and extra.get("assistant_model") is None
        and "cache" not in extra
        and "past_key_values" not in extra
    )


def _stack_left_padded(caches: list[DynamicCache], length: int) -> DynamicCache:
    """One batch's cache from single-row caches: each row's keys and values padded on the left to `length`
    positions (the padding is masked out by the batch's attention mask)."""
    stacked = DynamicCache()
    for index in range(len(caches[0].layers)):
        keys, values = [], []
        for cache in caches:
            layer = cache.layers[index]
            missing = length - layer.keys.shape[-2]
            keys.append(nn.functional.pad(layer.keys, (0, 0, missing, 0)))
            values.append(nn.functional.pad(layer.values, (0, 0, missing, 0)))
            layer.keys = layer.values = None  # the row's copy goes as soon as it is stacked
        stacked.update(torch.cat(keys), torch.cat(values), index)
    return stacked


def _left_pad(sequences: list[torch.Tensor], pad_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token sequences, padded on the left (so every prompt ends where generation starts)."""
    pad_id = pad_token_id if pad_token_id is not None else 0
    length = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, length - len(seq) :] = seq
        attention_mask[row, length - len(seq) :] = 1
    return input_ids, attention_mask


NVLM_D_Model.register_for_auto_class("AutoModel")
