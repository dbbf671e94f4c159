"""The model card's chat API, as a mixin of the model class: `chat`, `batch_chat`, `chat_without_sys_prompt`,
`chat_without_chat_prompt`, `chat_prompt`, `start_chat`, and `ChatSession`, the multi-turn conversation that
reuses its KV cache.

`NVLM_D_Model` inherits `NVLMChatMixin`, so `model.chat(...)` is the reference's call. The mixin builds prompts
(`conversation.build_prompt`), tokenizes them and calls the model's own `generate`, `get_visual_features` and
`forward`; it imports nothing from the modeling module, which knows it only as a base class.

`ChatSession` (`model.start_chat`) keeps a conversation's KV cache between turns: `chat(history=...)` rebuilds the
whole prompt every turn and runs the vision tower and the full prefill again. A session builds the same prompt
(`model.chat_prompt` with the same history), tokenizes it, and keeps the cache of every token it has already run:
only the tokens after the longest prefix shared with the cache are prefilled. The prompt is the one `chat` would
build, byte for byte, so greedy answers are `chat`'s; the answers' tokens as generated and as re-tokenized from the
stored text may differ, which only moves the point where the prefill starts.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig
from transformers.generation import LogitsProcessor, LogitsProcessorList
from transformers.utils import logging

from .conversation import IM_END_TOKEN, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, build_prompt, get_conv_template
from .model_inputs import check_pixel_values, check_visual_features, execution_device

logger = logging.get_logger(__name__)


class _GeneratedTokensOnly(LogitsProcessor):
    """Runs `processor` on the generated tokens alone, not on the prompt that precedes them in `input_ids`."""

    def __init__(self, processor: LogitsProcessor, prompt_length: int) -> None:
        self.processor = processor
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.processor(input_ids[:, self.prompt_length :], scores)


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


def _num_tiles(pixel_values: torch.Tensor | None, visual_features: torch.Tensor | None, config: Any) -> int:
    """How many tiles the images of a `chat` call hold (checked against `config`): 0 without images."""
    if pixel_values is not None and visual_features is not None:
        raise ValueError("Pass pixel_values or visual_features, not both")
    if visual_features is not None:
        return check_visual_features(visual_features, config).shape[0]
    if pixel_values is not None:
        return check_pixel_values(pixel_values, config).shape[0]
    return 0


def _check_question(question: Any) -> None:
    """A question is a string with some text: an empty one gets an error, as in `nvlm-d chat` and `nvlm-d batch`
    (NVLM-D would answer the bare system prompt, or describe the image unasked)."""
    if not isinstance(question, str):
        raise TypeError(f"a question must be a string, got {type(question).__name__}")
    if not question.strip():
        raise ValueError(f"the question is empty ({question!r}): ask something, e.g. 'Describe the image.'")


def _check_num_patches(num_patches_list: Any, num_tiles: int) -> list[int]:
    """`num_patches_list` (tiles per image) as ints summing to `num_tiles`; None means one image of all the tiles."""
    if num_patches_list is None:
        return [num_tiles] if num_tiles else []
    counts = _positive_counts("num_patches_list", num_patches_list)
    if sum(counts) != num_tiles:
        raise ValueError(f"num_patches_list sums to {sum(counts)} tiles but pixel_values holds {num_tiles} tiles")
    return counts


class NVLMChatMixin:
    """The card's chat API for NVLM-D's model class, which provides what it calls: `config`, `num_image_token`,
    `img_context_token_id`, `get_input_embeddings`, `get_visual_features`, `forward` and `generate` (new tokens
    only). `template` and `system_message` are the mixin's own: assign `system_message` to change `chat`'s system
    prompt."""

    # `chat`'s system prompt when none was assigned: the template's ("Answer the questions.").
    _system_message: str | None = None

    @property
    def template(self) -> str:
        """The conversation template's name (`config.template`, "chatml"), as InternVL's model exposes it."""
        return self.config.template

    @property
    def system_message(self) -> str:
        """`chat`'s system prompt: the template's ("Answer the questions.") until one is assigned, as in InternVL."""
        if self._system_message is not None:
            return self._system_message
        return get_conv_template(self.config.template).system_message

    @system_message.setter
    def system_message(self, value: str) -> None:
        self._system_message = value

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
        no_positions = torch.empty(0, dtype=torch.long)  # only the cache is wanted: no LM head over the vocabulary
        caches = []
        for row, row_images in zip(rows, per_row, strict=True):
            cache = DynamicCache()
            has_images = row_images is not None and len(row_images) > 0
            self(
                input_ids=row[None, :-1].to(device),
                pixel_values=row_images if has_images and pixel_values is not None else None,
                visual_features=row_images if has_images and pixel_values is None else None,
                cache=cache,
                logits_to_keep=no_positions,
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
        _check_question(question)
        num_patches_list = _check_num_patches(num_patches_list, _num_tiles(pixel_values, visual_features, self.config))
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
        num_tiles = _num_tiles(pixel_values, visual_features, self.config)
        per_question = _images_per_question(num_patches_list, len(questions), num_tiles)
        self._chat_image_token(tokenizer, IMG_CONTEXT_TOKEN)
        prompts = []
        for question, tiles in zip(questions, per_question, strict=True):
            _check_question(question)
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


class ChatSession:
    """A conversation with NVLM-D whose earlier turns stay in the KV cache (see the module docstring).

    Use `model.start_chat(tokenizer, generation_config)`, then `session.ask(question, pixel_values=...)` per turn:
    `pixel_values` are the images added in this turn only (`chat` instead takes all the conversation's images every
    turn). Placeholders follow `chat`'s rules: in the first turn, `<image>\\n` is put in front of a question with
    images and no `<image>`; later questions place their own.

    The cache grows with the conversation and lives on the model's devices. `max_tokens` (default: the decoder's
    `max_position_embeddings`) bounds the prompt plus the answer: a turn that would pass it raises ValueError and
    leaves the session as it was; start over with `reset()`. `pop_turn()` forgets the last turn (to ask it again,
    e.g. with other settings). Generation is one sequence at a time (no beams, one return sequence), greedy or
    sampled (seed with `torch.manual_seed` for reproducible samples); `repetition_penalty` and
    `no_repeat_ngram_size` look at each turn's answer only, as in `chat`. A turn that raises (out of memory in
    some layer, an interrupt) leaves the history and every layer of the cache as they were.
    """

    def __init__(
        self,
        model: NVLMChatMixin,
        tokenizer: Any,
        generation_config: dict | GenerationConfig | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config, self._generate_kwargs = _chat_generation_config(generation_config, tokenizer)
        self._streamer = _settings_streamer(self._generate_kwargs, None)  # the settings' streamer streams every turn
        if (self.config.num_beams or 1) > 1 or (self.config.num_return_sequences or 1) > 1:
            raise ValueError(
                "a ChatSession generates one sequence per turn: num_beams and num_return_sequences must be 1"
            )
        if self.config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"a ChatSession keeps a dynamic cache between turns; cache_implementation="
                f"{self.config.cache_implementation!r} is not supported"
            )
        limit = model.config.llm_config.max_position_embeddings if max_tokens is None else max_tokens
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        self.max_tokens = limit
        self.reset()

    def reset(self) -> None:
        """Forget the conversation: history, images and cache."""
        self.history: list[tuple[str, str]] = []
        self._num_patches: list[int] = []
        self._images_per_turn: list[int] = []  # how many of `_num_patches` each turn of `history` added
        self._visual_features: list[torch.Tensor] = []  # per image [tiles, 256, 12800], in conversation order
        self._cache = DynamicCache()
        self._cached_ids = torch.empty(0, dtype=torch.long)  # the tokens whose keys and values are in the cache

    def pop_turn(self) -> tuple[str, str]:
        """Forget the last turn (its question, answer and the images it added) and return (question, answer). The
        cache keeps its tokens: the next turn reuses the prefix it shares with them, so asking again costs only the
        last turn's prefill."""
        if not self.history:
            raise ValueError("the conversation has no turn to remove")
        added = self._images_per_turn.pop()
        if added:
            del self._num_patches[-added:]
            del self._visual_features[-added:]
        return self.history.pop()

    @property
    def num_cached_tokens(self) -> int:
        return int(self._cached_ids.numel())

    def ask(
        self,
        question: str,
        pixel_values: torch.Tensor | None = None,
        num_patches_list: Sequence[int] | None = None,
        streamer: Any = None,
    ) -> str:
        """Answer `question`, with the images added in this turn (`pixel_values` [tiles, 3, 448, 448], several
        images stacked with `num_patches_list`); returns the answer and appends the turn to `history`."""
        _check_question(question)
        streamer = streamer if streamer is not None else self._streamer  # this turn's, else the settings'
        new_counts = _check_num_patches(num_patches_list, _num_tiles(pixel_values, None, self.model.config))
        if new_counts and not self.history and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question  # as chat does on a first turn
        prompt = self.model.chat_prompt(question, [*self._num_patches, *new_counts], self.history or None)
        input_ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        budget = input_ids.shape[1] + (self.config.max_new_tokens or 0)
        if budget > self.max_tokens:
            raise ValueError(
                f"this turn needs {input_ids.shape[1]} prompt tokens + {self.config.max_new_tokens} new tokens, over "
                f"the session's max_tokens={self.max_tokens}: start a new conversation with reset()"
            )
        new_features = []
        if new_counts:
            with torch.no_grad():
                features = self.model.get_visual_features(pixel_values)
            new_features = list(features.split(new_counts))
        answer = self._generate(input_ids, [*self._visual_features, *new_features], streamer)
        self.history.append((question, answer))
        self._images_per_turn.append(len(new_counts))
        self._num_patches.extend(new_counts)
        self._visual_features.extend(new_features)
        return answer

    def _reusable_prefix(self, input_ids: torch.Tensor) -> int:
        """How many leading tokens of `input_ids` the cache holds already, never cutting a run of image tokens (their
        features enter whole tiles at a time)."""
        cached, ids = self._cached_ids, input_ids[0].cpu()
        shared = min(len(cached), len(ids) - 1)  # at least one token must be run to get the next token's logits
        mismatch = (cached[:shared] != ids[:shared]).nonzero()
        prefix = int(mismatch[0]) if len(mismatch) else shared
        image_token = self.model.img_context_token_id
        while 0 < prefix < len(ids) and ids[prefix] == image_token and ids[prefix - 1] == image_token:
            prefix -= 1
        return prefix

    def _generate(self, input_ids: torch.Tensor, features: list[torch.Tensor], streamer: Any) -> str:
        prefix = self._reusable_prefix(input_ids)
        image_tokens = int((input_ids[0, prefix:] == self.model.img_context_token_id).sum())
        tiles = image_tokens // self.model.num_image_token
        visual_features = torch.cat(features)[-tiles:] if tiles else None
        config, generate_kwargs = self._turn_settings(input_ids.shape[1])
        cached_ids, dropped = self._cached_ids, _crop_every_layer(self._cache, prefix)
        self._cached_ids = cached_ids[:prefix]
        try:
            new_tokens = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                visual_features=visual_features,
                cache=self._cache,
                generation_config=config,
                streamer=streamer,
                **generate_kwargs,
            )
        except BaseException:
            # A turn that failed (out of memory in layer k, Ctrl-C) may have stored some of its tokens in some
            # layers only: put every layer back to the tokens it held before the turn.
            _crop_every_layer(self._cache, prefix)
            # (layers this turn created, in a cache that was empty, held nothing: `zip` stops before them)
            for layer, (keys, values) in zip(self._cache.layers, dropped, strict=False):
                if keys is not None:
                    layer.update(keys, values)
            self._cached_ids = cached_ids
            raise
        sequence = torch.cat([input_ids[0].cpu(), new_tokens[0].cpu()])
        self._cached_ids = sequence[: self._cache.get_seq_length()]
        text = self.tokenizer.decode(new_tokens[0], skip_special_tokens=True)
        return text.split("<|im_end|>")[0].strip()

    def _turn_settings(self, prompt_length: int) -> tuple[GenerationConfig, dict]:
        """This turn's generation config and `generate` keywords: `repetition_penalty` and `no_repeat_ngram_size`
        become logits processors that see this turn's answer only, as `chat` applies them (the prompt, with the
        system turn, the history and the image tokens, would otherwise count as repetitions). `generate` gets the
        session's tokenizer (which `stop_strings` need) unless the settings name their own `tokenizer`, as in `chat`."""
        config = copy.deepcopy(self.config)
        processors = _on_generated_tokens_only(config, prompt_length)
        generate_kwargs = dict(self._generate_kwargs)
        generate_kwargs.setdefault("tokenizer", self.tokenizer)
        generate_kwargs["logits_processor"] = LogitsProcessorList(
            [*generate_kwargs.get("logits_processor", []), *processors]
        )
        return config, generate_kwargs


def _crop_every_layer(cache: DynamicCache, length: int) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Cut every layer of `cache` to its first `length` tokens; returns the keys and values cut off, per layer
    (None where nothing was). `DynamicCache.crop` removes one count from every layer, layer 0's excess, which after
    a forward pass stopped in layer k would leave the layers with different lengths."""
    dropped: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
    for layer in cache.layers:
        excess = layer.get_seq_length() - length
        if excess <= 0:
            dropped.append((None, None))
            continue
        dropped.append((layer.keys[..., length:, :].clone(), layer.values[..., length:, :].clone()))
        layer.crop(-excess)
    return dropped
