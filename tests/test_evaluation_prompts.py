"""NVLM's evaluation prompts per task (Megatron-LM NVLM-1.0's strings, reference/eval_facts.md), for hand-made
records in each dataset's schema, and what reaches the model: the text `batch_chat` gets and its token ids."""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval", reason="the [eval] extra (lmms-eval) is not installed")

from PIL import Image  # noqa: E402

from nvlm_d.evaluation.backends import HFBackend, Request, chat_messages  # noqa: E402
from nvlm_d.evaluation.tasks import utils  # noqa: E402

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


@pytest.mark.parametrize("function", [utils.text_short_answer])
def test_vqa_textvqa_chartqa_prompt(function):
    assert function({"question": "What is the total?"}) == "What is the total?" + SHORT


def test_ocrbench_prompt_is_the_question():
    assert utils.text_question({"question": " what is written in the image? "}) == "what is written in the image?"


def test_ai2d_prompt_letters_the_options():
    doc = {"question": "Which stage is the egg?", "options": ["A", "B", "C", "D"]}
    assert utils.text_ai2d(doc) == f"Which stage is the egg?\nA. A\nB. B\nC. C\nD. D\n{LETTER}"


def test_mmmu_multiple_choice_prompt_drops_image_tags():
    doc = {"question": "<image 1> What is shown?", "options": "['a cat', 'a dog']", "question_type": "multiple-choice"}
    assert utils.text_mmmu(doc) == f"What is shown?\n(A) a cat\n(B) a dog\n\n{LETTER}"


def test_mmmu_open_prompt():
    doc = {"question": "How many legs?", "options": "[]", "question_type": "open"}
    assert utils.text_mmmu(doc) == "How many legs?" + SHORT


def test_mathvista_prompts():
    choice = {"question_type": "multi_choice", "question": "Which is larger?", "choices": ["3", "5"], "query": "x"}
    assert utils.text_mathvista(choice) == f"Which is larger?\nA. 3\nB. 5\n{LETTER}"
    free = {"question_type": "free_form", "query": "Hint: Please answer with an integer.\nQuestion: How many?"}
    assert utils.text_mathvista(free) == "Please answer with an integer.\nQuestion: How many?"


def test_caption_prompt():
    assert utils.text_caption({}) == "Provide a one-sentence caption for provided image."


def test_docvqa_prompt_is_a_named_choice_with_the_sft_default():
    doc = {"question": "What is the date?"}
    assert utils.text_docvqa(doc) == "What is the date?\nAnswer this question using the text in the image directly."
    assert utils.text_docvqa(doc, {"prompt": "single_word_phrase_number"}) == (
        "What is the date?\nAnswer the question using a single word, phrase, or number."
    )
    with pytest.raises(ValueError, match="prompt must be one of"):
        utils.text_docvqa(doc, {"prompt": "mine"})


def test_mmbench_prompt_puts_the_hint_first():
    doc = {"question": "Which one?", "hint": "Look closely.", "A": "x", "B": "y", "C": None, "D": None}
    assert utils.text_mmbench(doc) == f"Look closely.\nWhich one?\nA. x\nB. y\n{LETTER}"


def test_missing_image_names_the_record():
    with pytest.raises(ValueError, match="question_id=7: no image"):
        utils.visual_image({"question_id": 7, "question": "q"})


def test_record_without_answers_names_the_record():
    with pytest.raises(ValueError, match="questionId=3: no answer"):
        utils.score_anls({"questionId": 3, "answers": []}, ["x"])


class RecordingModel:
    """Stands in for NVLM-D where only the call matters: records what `batch_chat` gets, answers `ok`."""

    dtype = None

    def __init__(self):
        self.calls = []

    def batch_chat(self, tokenizer, pixel_values, questions, config, num_patches_list):
        self.calls.append((pixel_values.shape[0], list(questions), dict(config), list(num_patches_list)))
        return ["ok"] * len(questions)


def test_hf_backend_puts_the_image_first_and_decodes_greedily():
    import torch

    model = RecordingModel()
    model.dtype = torch.float32
    image = Image.new("RGB", (900, 450), "white")  # 2x1 grid + thumbnail = 3 tiles
    answers = HFBackend(model, tokenizer=None, batch_size=4).answer(
        [Request("Q1" + SHORT, [image], 16), Request("Q2", [image], 16)]
    )
    assert answers == ["ok", "ok"]
    tiles, questions, config, patches = model.calls[0]
    assert questions == ["<image>\nQ1" + SHORT, "<image>\nQ2"]
    assert config == {"max_new_tokens": 16, "do_sample": False}
    assert patches == [3, 3] and tiles == 6


def test_openai_messages_carry_the_system_message_image_and_prompt():
    messages = chat_messages(Request("What?", [Image.new("RGB", (8, 8))], 16))
    assert messages[0] == {"role": "system", "content": "Answer the questions."}
    image_part, text_part = messages[1]["content"]
    assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert text_part == {"type": "text", "text": "What?"}


def test_prompt_text_and_token_ids_reaching_the_model(tiny_model, tokenizer):
    """NVLM's chatml (no newline after <|im_end|>), the one-tile image tagged as the thumbnail, then the prompt."""
    text = utils.text_short_answer({"question": "What is the total?"})
    prompt = tiny_model.chat_prompt("<image>\n" + text, [1])
    pads = "<|vision_pad|>" * tiny_model.num_image_token
    expected = (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<Image><tile_global_thumbnail>"
        f"{pads}</Image>\nWhat is the total?\nAnswer the question using a single word or phrase.<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert prompt == expected
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|> assistant \n
    assert ids.count(tokenizer.convert_tokens_to_ids("<|vision_pad|>")) == tiny_model.num_image_token
