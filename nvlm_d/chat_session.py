"""Multi-turn chat that prefills only what is new: a follow-up question reuses the KV cache of the turns before it.

`chat(history=...)` rebuilds the whole prompt every turn and runs the vision tower and the full prefill again. A
`ChatSession` builds the same prompt (`model.chat_prompt` with the same history), tokenizes it, and keeps
the cache of every token it has already run: only the tokens after the longest prefix shared with the cache are
prefilled. The prompt is the one `chat` would build, byte for byte, so greedy answers are `chat`'s; the answers'
tokens as generated and as re-tokenized from the stored text may differ, which only moves the point where the
prefill starts.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation import LogitsProcessorList

from .conversation import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from .modeling_nvlm_d import NVLM_D_Model


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
        model: NVLM_D_Model,
        tokenizer: Any,
        generation_config: dict | GenerationConfig | None = None,
        max_tokens: int | None = None,
    ) -> None:
        from .modeling_nvlm_d import _chat_generation_config, _settings_streamer

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
        self.model._check_question(question)
        streamer = streamer if streamer is not None else self._streamer  # this turn's, else the settings'
        new_counts = self.model._check_num_patches(num_patches_list, self.model._num_tiles(pixel_values, None))
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
                tokenizer=self.tokenizer,
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
        system turn, the history and the image tokens, would otherwise count as repetitions)."""
        from .modeling_nvlm_d import _on_generated_tokens_only

        config = copy.deepcopy(self.config)
        processors = _on_generated_tokens_only(config, prompt_length)
        generate_kwargs = dict(self._generate_kwargs)
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
