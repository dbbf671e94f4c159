"""NVLM's evaluation prompts and answer post-processing (Megatron-LM `NVLM-1.0`, examples/multimodal).

A prompt here is the user's text after the image: the model puts each image's `<image>` placeholder first, on its
own line (`<image>\\n{prompt}`), as `model.chat` does and as NVLM's evaluation did; the system message is the chat
template's default, `Answer the questions.`. The prompt pieces that vary per task (the instruction after the
question) come from the task's YAML (`lmms_eval_specific_kwargs`), so that a user changes them there.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence

SYSTEM_MESSAGE = "Answer the questions."
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
CAPTION = "Provide a one-sentence caption for provided image."
MAX_TILES = 6  # plus the thumbnail
MAX_NEW_TOKENS = 16

# Tasks without a prompt published by NVIDIA for NVLM-D: the named choices and the default of each.
UNPUBLISHED_PROMPTS = {
    "docvqa": {
        "sft": "\nAnswer this question using the text in the image directly.",  # NVLM's SFT prompt (default)
        "single_word_phrase_number": "\nAnswer the question using a single word, phrase, or number.",  # Megatron main
    },
    "realworldqa": {
        "dataset": "",  # the dataset's question, which carries its options and instruction (default)
        "single_word": "\n" + SHORT_ANSWER,
    },
}


def first_line(text: str) -> str:
    """NVLM's cut: the text up to `<|im_end|>`, stripped, then its first paragraph, then that paragraph's first
    line."""
    text = text.split("<|im_end|>")[0].strip()
    return text.split("\n\n")[0].split("\n")[0].strip()


def short_answer_prompt(question: str, instruction: str = "\n" + SHORT_ANSWER) -> str:
    """VQAv2, TextVQA, ChartQA (and DocVQA with its chosen instruction): the question, then the instruction."""
    return f"{question}{instruction}"


def options_of(doc_options: str | Sequence[str]) -> list[str]:
    """MMMU stores its options as the text of a Python list; other datasets as a list."""
    if isinstance(doc_options, str):
        value = ast.literal_eval(doc_options)
        if not isinstance(value, list):
            raise ValueError(f"options must be a list, got {doc_options!r}")
        return [str(option) for option in value]
    return [str(option) for option in doc_options]


_IMAGE_TAG = re.compile(r"<image \d+>")


def mmmu_prompt(question: str, options: Sequence[str], multiple_choice: bool) -> str:
    """MMMU's llava1.5 format with the `<image k>` tags removed: `(A) option` lines, a blank line and the letter
    instruction for multiple choice; the short-answer instruction for open questions."""
    question = _IMAGE_TAG.sub("", question).strip()
    if not multiple_choice:
        return f"{question}\n{SHORT_ANSWER}"
    lines = "\n".join(f"({chr(ord('A') + index)}) {option}" for index, option in enumerate(options))
    return f"{question}\n{lines}\n\n{LETTER_ANSWER}"


def lettered_choices_prompt(question: str, options: Sequence[str], hint: str = "") -> str:
    """MathVista multiple choice, AI2D, MMBench: `A. option` lines after the question, then the letter
    instruction; MMBench puts its hint first."""
    lines = "\n".join(f"{chr(ord('A') + index)}. {option}" for index, option in enumerate(options))
    head = f"{hint}\n{question}" if hint else question
    return f"{head}\n{lines}\n{LETTER_ANSWER}"


def mathvista_free_form_prompt(query: str) -> str:
    """MathVista free form: the dataset's `query` with `Hint: ` removed."""
    return query.replace("Hint: ", "")
