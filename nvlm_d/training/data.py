"""Training examples from conversation records: the JSONL format InternVL and LLaVA users already have.

One record a line:

    {"image": "a.jpg" | ["a.jpg", "b.jpg"] (optional),
     "conversations": [{"from": "system", "value": "..."} (optional),
                       {"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
                       ... more human/gpt turns]}

Image paths are relative to the file's folder (or `image_folder`). Each `<image>` placeholder stands for the next
image; a record with one image and no placeholder gets `<image>\\n` in front of its first question, as `chat` does.

The text of an example is built by `conversation.build_prompt`, the code `chat` builds its prompts with: the
prompt of the last turn, with the earlier turns as its history, followed by the last answer and `<|im_end|>`. So
what the model learns to continue is exactly what `chat` will show it. Labels are the token ids of every answer and
its `<|im_end|>`; every other position (system turn, questions, image tokens, role headers) is -100.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.utils import logging

from ..conversation import IM_END_TOKEN, IMAGE_PLACEHOLDER, build_prompt
from ..image_processing_nvlm_d import NVLM_D_ImageProcessor

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100  # the label of a position the loss skips
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
BAD_RECORD_POLICIES = ("error", "skip")


class RecordError(ValueError):
    """A record that cannot become a training example; the message names the file and line.

    Raised in a DataLoader worker process, it reaches the main process re-made around the worker's whole traceback
    text (torch's way of passing worker errors on); `record_message()` gives the original one-line message back.
    """

    def record_message(self) -> str:
        text = str(self)
        marker = f"{type(self).__name__}: "
        if "Original Traceback" not in text or marker not in text:
            return text
        return text[text.rindex(marker) + len(marker) :].strip()


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A validated record: its images (resolved paths), optional system message and (question, answer) turns."""

    line: int
    images: list[Path]
    system: str | None
    turns: list[tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class Example:
    """A tokenized conversation: `input_ids` and `labels` (same length), and the tiles of each image."""

    line: int
    input_ids: list[int]
    labels: list[int]
    images: list[Path]
    num_patches: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for every non-blank line; a line that is not JSON is returned as a RecordError."""
    with open(path, encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, RecordError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")


def parse_record(record: Any, where: str, image_folder: Path, line: int = 0) -> Conversation:
    """Validate one record (see the module docstring) and resolve its image paths.

    Raises:
        RecordError: naming `where` (file:line) and what is wrong.
    """
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str) or "from" not in message:
            raise RecordError(
                f"{where}: conversations[{index}] must be {{'from': ROLE, 'value': TEXT}}, got {message!r}"
            )
    system = None
    if messages[0]["from"] == "system":
        system, messages = messages[0]["value"], messages[1:]
    if not messages or len(messages) % 2:
        raise RecordError(f"{where}: conversations must alternate human and gpt turns, ending with a gpt answer")
    turns = []
    for index in range(0, len(messages), 2):
        question, answer = messages[index], messages[index + 1]
        if question["from"] not in HUMAN_ROLES or answer["from"] not in ASSISTANT_ROLES:
            raise RecordError(
                f"{where}: turn {index // 2 + 1} is {question['from']!r} then {answer['from']!r}; expected a human "
                f"({'/'.join(HUMAN_ROLES)}) question, then a gpt ({'/'.join(ASSISTANT_ROLES)}) answer"
            )
        if not question["value"].strip() or not answer["value"].strip():
            raise RecordError(f"{where}: turn {index // 2 + 1} has an empty question or answer")
        turns.append((question["value"], answer["value"]))
    images = _image_paths(record.get("image"), where, image_folder)
    placeholders = sum(question.count(IMAGE_PLACEHOLDER) for question, _ in turns)
    if len(images) == 1 and placeholders == 0:
        turns[0] = (f"{IMAGE_PLACEHOLDER}\n{turns[0][0]}", turns[0][1])
        placeholders = 1
    if placeholders != len(images):
        raise RecordError(
            f"{where}: the questions hold {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but the record has "
            f"{len(images)} image(s); put one {IMAGE_PLACEHOLDER} where each image goes"
        )
    if any(IMAGE_PLACEHOLDER in answer for _, answer in turns):
        raise RecordError(f"{where}: an answer holds {IMAGE_PLACEHOLDER}; images go in the questions")
    return Conversation(line=line, images=images, system=system, turns=turns)


def _image_paths(value: Any, where: str, image_folder: Path) -> list[Path]:
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise RecordError(f"{where}: 'image' must be a path or a list of paths, got {value!r}")
    paths = [image_folder / name for name in names]
    for path in paths:
        if not path.is_file():
            raise RecordError(f"{where}: image not found: {path}")
    return paths


def decode_image(path: Path) -> tuple[int, int] | str:
    """(width, height) of an image file whose pixels all decode, or why they do not (a truncated JPEG has a valid
    header: only decoding every pixel finds it)."""
    try:
        with Image.open(path) as image:
            image.load()
            width, height = image.size
    except (OSError, EOFError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"cannot read image {path}: {exc}"
    if width < 1 or height < 1:
        return f"image {path} has no pixels ({width}x{height})"
    return width, height


def decode_images(paths: Iterable[Path]) -> dict[Path, tuple[int, int] | str]:
    """`decode_image` of every path, in threads (PIL releases the GIL while it decodes)."""
    unique = sorted(set(paths))
    workers = max(1, min(16, os.cpu_count() or 1, len(unique)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nvlm_d-image-check") as pool:
        return dict(zip(unique, pool.map(decode_image, unique), strict=True))


def conversation_text(
    conversation: Conversation, num_patches: Sequence[int], num_image_token: int, template: str = "chatml"
) -> tuple[str, list[tuple[int, int]]]:
    """The example's text and the character spans [start, end) of each answer and its `<|im_end|>`.

    Turn k's prompt is `build_prompt(question_k, tiles of the images so far, history=turns before k)`, the string
    `chat` sends for that turn; it is a prefix of the whole text, which is the last turn's prompt + answer +
    `<|im_end|>`. So each answer starts where its prompt ends.
    """
    spans = []
    images_so_far = 0
    text = ""
    for k, (question, answer) in enumerate(conversation.turns):
        images_so_far += question.count(IMAGE_PLACEHOLDER)
        prompt = build_prompt(
            question,
            list(num_patches[:images_so_far]),
            history=conversation.turns[:k],
            template=template,
            system_message=conversation.system,
            num_image_token=num_image_token,
        )
        text = prompt + answer + IM_END_TOKEN
        spans.append((len(prompt), len(text)))
    return text, spans


def tokenize_conversation(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of `text` (as `chat` tokenizes a prompt) and labels: the id where a token overlaps an answer span,
    else -100. Tokenizing the whole text at once gives the ids the model sees at inference, even where a token
    straddles a turn boundary."""
    encoding = tokenizer(text, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (start, end) in enumerate(encoding["offset_mapping"]):
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index < len(spans) and start < spans[span_index][1] and end > spans[span_index][0]:
            labels[position] = input_ids[position]
    return input_ids, labels


class ConversationDataset(torch.utils.data.Dataset):
    """Training examples from a JSONL file of conversation records (see the module docstring).

    Every record is checked and tokenized, and every image decoded whole, when the dataset is built, so a bad record
    (a missing, truncated or corrupt image included) is found before training starts. Each item holds `input_ids`,
    `labels` (LongTensor [tokens]) and `pixel_values` (float32 [tiles, 3, 448, 448]; 0 tiles for a text-only
    example), decoded again when the item is read, tiled as `processor.apply_chat_template` and
    `load_image(max_num=max_dynamic_patch)` tile.

    Args:
        path: the JSONL file.
        tokenizer: the model's tokenizer.
        config: the model's `NVLM_D_Config` (template, tile size, tiling limits, image tokens per tile).
        max_length: the most tokens an example may have (image tokens included); longer ones are left out with a
            warning naming their lines. None: no limit.
        bad_records: "error" (raise a RecordError naming the line) or "skip" (leave the record out, log it, and
            count it in `skipped`).
        image_folder: where relative image paths start (default: the JSONL file's folder).
        max_dynamic_patch: the most tiles per image (default: the config's, 6), plus the thumbnail.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: Any,
        config: Any,
        max_length: int | None = None,
        bad_records: str = "error",
        image_folder: str | os.PathLike | None = None,
        max_dynamic_patch: int | None = None,
    ) -> None:
        if bad_records not in BAD_RECORD_POLICIES:
            raise ValueError(f"bad_records must be one of {BAD_RECORD_POLICIES}, got {bad_records!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)):
            raise TypeError(f"max_length must be an int or None, got {max_length!r}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training data not found: {path}")
        self.path = path
        self.config = config
        self.image_processor = NVLM_D_ImageProcessor(
            image_size=config.force_image_size,
            min_dynamic_patch=config.min_dynamic_patch,
            max_dynamic_patch=max_dynamic_patch or config.max_dynamic_patch,
            use_thumbnail=config.use_thumbnail,
        )
        self.examples: list[Example] = []
        self.skipped: Counter[str] = Counter()  # reason -> records left out
        folder = Path(image_folder) if image_folder is not None else path.parent
        conversations = []
        for number, record in read_jsonl(path):
            try:
                if isinstance(record, RecordError):
                    raise record
                conversations.append(parse_record(record, f"{path}:{number}", folder, number))
            except RecordError as exc:
                self._bad_record(exc, bad_records)
        # Every image is decoded whole, once, here: a file that cannot be decoded fails now, naming its record, and not
        # in the middle of training.
        images = decode_images(image for conversation in conversations for image in conversation.images)
        too_long = []
        for conversation in conversations:
            try:
                example = self._example(conversation, images, tokenizer)
            except RecordError as exc:
                self._bad_record(exc, bad_records)
                continue
            if max_length is not None and len(example) > max_length:
                too_long.append((conversation.line, len(example)))
                continue
            self.examples.append(example)
        if too_long:
            self.skipped["longer than max_length"] = len(too_long)
            shown = ", ".join(f"line {line} ({length} tokens)" for line, length in too_long[:10])
            more = f" and {len(too_long) - 10} more" if len(too_long) > 10 else ""
            logger.warning(
                f"{path}: left out {len(too_long)} example(s) longer than max_length={max_length} tokens: "
                f"{shown}{more}. Raise max_length, or lower max_dynamic_patch to give images fewer tiles."
            )
        if not self.examples:
            raise ValueError(f"{path}: no usable training examples ({dict(self.skipped) or 'the file is empty'})")

    def _bad_record(self, error: RecordError, policy: str) -> None:
        if policy == "error":
            raise error
        logger.warning(f"skipped: {error}")
        self.skipped["bad record"] += 1

    def _example(
        self, conversation: Conversation, images: dict[Path, tuple[int, int] | str], tokenizer: Any
    ) -> Example:
        num_patches = []
        for image in conversation.images:
            size = images[image]
            if isinstance(size, str):
                raise RecordError(f"{self.path}:{conversation.line}: {size}")
            width, height = size
            num_patches.append(self.image_processor.get_number_of_image_patches(height, width))
        text, spans = conversation_text(conversation, num_patches, self.config.num_image_token, self.config.template)
        input_ids, labels = tokenize_conversation(tokenizer, text, spans)
        return Example(conversation.line, input_ids, labels, conversation.images, num_patches)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each example, for packing and length-grouped batching."""
        return [len(example) for example in self.examples]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        size = self.config.force_image_size
        if example.images:
            try:
                tiles = self.image_processor(images=[str(p) for p in example.images], return_tensors="pt")
            except (OSError, ValueError) as exc:
                raise RecordError(f"{self.path}:{example.line}: cannot load its images: {exc}") from exc
            if list(tiles["num_patches"]) != example.num_patches:
                raise RecordError(
                    f"{self.path}:{example.line}: the images changed since the dataset was built "
                    f"(tiles {list(tiles['num_patches'])}, expected {example.num_patches})"
                )
            pixel_values = tiles["pixel_values"]
        else:
            pixel_values = torch.zeros(0, 3, size, size)
        return {
            "input_ids": torch.tensor(example.input_ids, dtype=torch.long),
            "labels": torch.tensor(example.labels, dtype=torch.long),
            "pixel_values": pixel_values,
        }
