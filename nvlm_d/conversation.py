"""NVLM-D's prompt format: the chatml conversation template and the expansion of `<image>` placeholders.

Everything that turns a question (and its history and images) into prompt text lives here, so that
`NVLM_D_Model.chat`, `batch_chat`, the tokenizer's jinja `chat_template` and the tests share one definition.
The strings are NVLM-D-72B's own: its published scores were measured with exactly this text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

IMAGE_PLACEHOLDER = "<image>"
IMG_START_TAG = "<Image>"
IMG_END_TAG = "</Image>"
IMG_CONTEXT_TOKEN = "<|vision_pad|>"
THUMBNAIL_TAG = "<tile_global_thumbnail>"
IM_END_TOKEN = "<|im_end|>"
DEFAULT_SYSTEM_MESSAGE = "Answer the questions."


@dataclasses.dataclass
class Conversation:
    """A chat in NVLM's separator style: `system + sep`, then `role + message + sep` per finished message.

    Unlike Qwen's own chat template there is no newline after the separator: NVLM-D was trained and evaluated
    with `<|im_end|><|im_start|>`, and a newline there changes the tokens the model sees.
    """

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    messages: list[list[str | None]] = dataclasses.field(default_factory=list)

    def append_message(self, role: str, message: str | None) -> None:
        """Append a turn; `message=None` leaves the turn open for the model to complete."""
        self.messages.append([role, message])

    def get_prompt(self, include_system: bool = True) -> str:
        prompt = self.system_template.format(system_message=self.system_message) + self.sep if include_system else ""
        for role, message in self.messages:
            prompt += role if message is None else role + message + self.sep
        return prompt

    def copy(self) -> Conversation:
        return dataclasses.replace(self, messages=[list(turn) for turn in self.messages])


_TEMPLATES: dict[str, Conversation] = {
    "chatml": Conversation(
        name="chatml",
        system_template="<|im_start|>system\n{system_message}",
        system_message=DEFAULT_SYSTEM_MESSAGE,
        roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
        sep=IM_END_TOKEN,
    ),
}


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the named template (NVLM-D-72B ships one: `chatml`)."""
    if name not in _TEMPLATES:
        raise ValueError(f"Unknown conversation template {name!r}; known templates: {sorted(_TEMPLATES)}")
    return _TEMPLATES[name].copy()


def tile_tags(num_tiles: int) -> list[str]:
    """NVLM's 1-D tile tags: `<tile_1>` ... `<tile_{n-1}>`, then the thumbnail tag, which is always last.

    A single-tile image has no thumbnail of its own, yet its one tile is still tagged as the thumbnail.
    """
    return [f"<tile_{k}>" for k in range(1, num_tiles)] + [THUMBNAIL_TAG]


def image_prompt(num_tiles: int, num_image_token: int = 256, context_token: str = IMG_CONTEXT_TOKEN) -> str:
    """The text that stands for one image of `num_tiles` tiles: tags, each followed by its context tokens."""
    body = "".join(tag + context_token * num_image_token for tag in tile_tags(num_tiles))
    return IMG_START_TAG + body + IMG_END_TAG


def expand_image_placeholders(
    text: str,
    num_patches_list: Sequence[int],
    num_image_token: int = 256,
    context_token: str = IMG_CONTEXT_TOKEN,
) -> str:
    """Replace each `<image>` in `text`, in order, by the prompt of the image with that many tiles.

    Raises:
        ValueError: the number of `<image>` placeholders differs from the number of images.
    """
    num_placeholders = text.count(IMAGE_PLACEHOLDER)
    if num_placeholders != len(num_patches_list):
        raise ValueError(
            f"The prompt has {num_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(num_patches_list)} "
            f"image(s) were given (num_patches_list={list(num_patches_list)}); put one {IMAGE_PLACEHOLDER} "
            "in the question (or its history) for each image."
        )
    pieces = text.split(IMAGE_PLACEHOLDER)
    expanded = [pieces[0]]
    for num_tiles, piece in zip(num_patches_list, pieces[1:], strict=True):
        expanded.append(image_prompt(num_tiles, num_image_token, context_token))
        expanded.append(piece)
    return "".join(expanded)


def _validate_history(history: object) -> list[tuple[str, str]]:
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}")
    for index, turn in enumerate(history):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2 or not all(isinstance(part, str) for part in turn):
            raise TypeError(f"history[{index}] must be a (question, answer) pair of strings, got {turn!r}")
    return [tuple(turn) for turn in history]


def build_prompt(
    question: str,
    num_patches_list: Sequence[int] = (),
    history: Sequence[tuple[str, str]] | None = None,
    template: str = "chatml",
    system_message: str | None = None,
    num_image_token: int = 256,
    context_token: str = IMG_CONTEXT_TOKEN,
    mode: str = "chat",
) -> str:
    """The exact prompt text NVLM-D's `chat` feeds the tokenizer.

    Args:
        question: the user's turn; may hold `<image>` placeholders.
        num_patches_list: tiles per image (thumbnail included), one entry per image, in placeholder order.
        history: earlier (question, answer) turns. Images are expanded wherever their placeholders sit,
            so a first question that kept its `<image>` carries the image in later rounds too.
        template: conversation template name.
        system_message: overrides the template's system message (`Answer the questions.`).
        mode: `"chat"` (system turn, then the conversation), `"no_system"` (the conversation without a
            system turn) or `"raw"` (the question alone, no template).

    When images are given, there is no history and the question has no `<image>`, `<image>\\n` is put in
    front of it, as the reference does.

    Raises:
        TypeError: `question` is not a string, or `history` is malformed.
        ValueError: empty question, unknown template or mode, or placeholders that do not match the images.
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}")
    if not question.strip():
        raise ValueError("question is empty")
    if mode not in ("chat", "no_system", "raw"):
        raise ValueError(f"mode must be 'chat', 'no_system' or 'raw', got {mode!r}")
    turns = [] if history is None else _validate_history(history)
    if num_patches_list and history is None and IMAGE_PLACEHOLDER not in question:
        question = IMAGE_PLACEHOLDER + "\n" + question

    if mode == "raw":
        text = question
    else:
        conversation = get_conv_template(template)
        if system_message is not None:
            conversation.system_message = system_message
        user, assistant = conversation.roles
        for past_question, past_answer in turns:
            conversation.append_message(user, past_question)
            conversation.append_message(assistant, past_answer)
        conversation.append_message(user, question)
        conversation.append_message(assistant, None)
        text = conversation.get_prompt(include_system=mode == "chat")
    return expand_image_placeholders(text, num_patches_list, num_image_token, context_token)


# Renders the same text as `build_prompt` (before image expansion) for `apply_chat_template`: NVLM's default
# system message when none is given, no newline after `<|im_end|>`. Content given as a list of parts renders image
# parts as the `<image>` placeholder followed by a newline. Each assistant answer and its `<|im_end|>` sit in a
# `{% generation %}` block, so that `return_assistant_tokens_mask=True` marks exactly what a fine-tune learns.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + render(messages[0]['content']) + '<|im_end|>' -}}"
    "{%- set conversation = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>' -}}"
    "{%- set conversation = messages -%}"
    "{%- endif -%}"
    "{%- for message in conversation -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}{{- render(message['content']) + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
