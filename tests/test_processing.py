"""The transformers-native way in: `AutoProcessor` + `apply_chat_template` + `model.generate(**inputs)`, and
`pipeline("image-text-to-text")`, give the prompt, pixels and answers of the card's way (`load_image` + `chat`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, pipeline

from nvlm_d.conversation import build_prompt
from nvlm_d.image_processing_nvlm_d import load_image

GREEDY = {"max_new_tokens": 8, "do_sample": False}


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, str]:
    """Images of different shapes (so different tile counts) as PNG files."""
    directory = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    paths = {}
    for name, (width, height) in {"wide": (1200, 400), "square": (300, 300), "tall": (500, 1400)}.items():
        pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        paths[name] = str(directory / f"{name}.png")
        Image.fromarray(pixels).save(paths[name])
    return paths


def user(*parts) -> dict:
    content = [
        {"type": "image", "image": part[1]} if isinstance(part, tuple) else {"type": "text", "text": part}
        for part in parts
    ]
    return {"role": "user", "content": content}


def render(processor, messages, **kwargs):
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


def card_inputs(tokenizer, question, paths, history=None, max_num=6):
    """What the card's way feeds the model: `load_image` per image and the prompt `chat` builds."""
    tiles = [load_image(path, max_num=max_num) for path in paths]
    prompt = build_prompt(question, [len(t) for t in tiles], history)
    pixel_values = torch.cat(tiles) if tiles else None
    return tokenizer(prompt, return_tensors="pt").input_ids, pixel_values


def test_a_text_only_conversation_gives_the_ids_of_chats_prompt(processor, tokenizer):
    inputs = render(processor, [user("Hello, who are you?")])
    expected_ids, _ = card_inputs(tokenizer, "Hello, who are you?", [])
    assert torch.equal(inputs["input_ids"], expected_ids)
    assert "pixel_values" not in inputs


def test_one_image_gives_chats_prompt_and_load_images_pixels(processor, tokenizer, image_files):
    inputs = render(processor, [user(("image", image_files["wide"]), "Describe the image.")])
    expected_ids, expected_pixels = card_inputs(tokenizer, "<image>\nDescribe the image.", [image_files["wide"]])
    assert torch.equal(inputs["input_ids"], expected_ids)
    assert torch.equal(inputs["pixel_values"], expected_pixels)
    assert inputs["pixel_values"].shape[0] == 4  # 3x1 grid + thumbnail


def test_three_images_are_expanded_in_order(processor, tokenizer, image_files):
    names = ["wide", "square", "tall"]
    parts = [piece for k, name in enumerate(names) for piece in (f"Image-{k + 1}: ", ("image", image_files[name]))]
    inputs = render(processor, [user(*parts, "Compare them.")])
    question = "Image-1: <image>\nImage-2: <image>\nImage-3: <image>\nCompare them."
    expected_ids, expected_pixels = card_inputs(tokenizer, question, [image_files[n] for n in names])
    assert torch.equal(inputs["input_ids"], expected_ids)
    assert torch.equal(inputs["pixel_values"], expected_pixels)


def test_a_multi_turn_conversation_with_an_image_in_its_history(processor, tokenizer, image_files):
    messages = [
        user(("image", image_files["tall"]), "What is it?"),
        {"role": "assistant", "content": [{"type": "text", "text": "A tower."}]},
        user("How tall is it?"),
    ]
    inputs = render(processor, messages)
    history = [("<image>\nWhat is it?", "A tower.")]
    expected_ids, expected_pixels = card_inputs(tokenizer, "How tall is it?", [image_files["tall"]], history)
    assert torch.equal(inputs["input_ids"], expected_ids)
    assert torch.equal(inputs["pixel_values"], expected_pixels)


def test_tiling_settings_come_from_the_config_and_may_be_overridden_per_call(processor, tokenizer, image_files):
    assert processor.image_processor.max_dynamic_patch == 6  # the config's max_dynamic_patch
    inputs = render(processor, [user(("image", image_files["tall"]), "Describe.")], max_dynamic_patch=12)
    expected_ids, expected_pixels = card_inputs(tokenizer, "<image>\nDescribe.", [image_files["tall"]], max_num=12)
    assert torch.equal(inputs["pixel_values"], expected_pixels)
    assert torch.equal(inputs["input_ids"], expected_ids)


def test_exif_orientation_is_ignored_as_in_the_card(processor, tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (200, 600, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": transformers' own loader would turn the image upright
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif)
    inputs = render(processor, [user(("image", str(path)), "Describe.")])
    assert torch.equal(inputs["pixel_values"], load_image(path, max_num=6))


def test_generate_on_the_processors_inputs_answers_as_chat_does(processor, tiny_model, tokenizer, image_files):
    inputs = render(processor, [user(("image", image_files["wide"]), "Describe the image.")])
    new_tokens = tiny_model.generate(**inputs, **GREEDY)
    answer = processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
    pixel_values = load_image(image_files["wide"], max_num=6)
    assert answer == tiny_model.chat(tokenizer, pixel_values, "Describe the image.", GREEDY)
    assert answer


def test_a_padded_batch_of_conversations_answers_each_as_chat_does(processor, tiny_model, tokenizer, image_files):
    conversations = [[user(("image", image_files["square"]), "Describe.")], [user("Hello, who are you today?")]]
    inputs = render(processor, conversations, padding=True)
    assert (inputs["attention_mask"][:, 0] == 0).any()  # left padding
    answers = processor.batch_decode(tiny_model.generate(**inputs, **GREEDY), skip_special_tokens=True)
    expected = [
        tiny_model.chat(tokenizer, load_image(image_files["square"], max_num=6), "Describe.", GREEDY),
        tiny_model.chat(tokenizer, None, "Hello, who are you today?", GREEDY),
    ]
    assert [answer.strip() for answer in answers] == expected


def test_assistant_tokens_mask_marks_exactly_the_answers_and_their_end_tokens(processor, tokenizer, image_files):
    answers = ["A red square.", "Yes, twice as wide."]
    messages = [
        user(("image", image_files["square"]), "What is it?"),
        {"role": "assistant", "content": answers[0]},
        user("Is it large?"),
        {"role": "assistant", "content": answers[1]},
    ]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True
    )
    # the label mask a user builds by hand: each answer's tokens and its <|im_end|>, found by tokenizing the
    # conversation up to each answer
    ids = inputs["input_ids"][0].tolist()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = [0] * len(ids)
    history = [("<image>\nWhat is it?", answers[0]), ("Is it large?", answers[1])]
    num_tiles = [len(load_image(image_files["square"], max_num=6))]
    for turn, (question, answer) in enumerate(history):
        prefix = build_prompt(question, num_tiles, history[:turn])
        start = len(tokenizer(prefix).input_ids)
        answer_ids = tokenizer(answer).input_ids + [im_end]
        assert ids[start : start + len(answer_ids)] == answer_ids
        expected[start : start + len(answer_ids)] = [1] * len(answer_ids)
    assert inputs["assistant_masks"][0].tolist() == expected


def test_pipeline_answers_a_chat_with_an_image_as_chat_does(tiny_checkpoint, tiny_model, tokenizer, image_files):
    pipe = pipeline("image-text-to-text", model=str(tiny_checkpoint), trust_remote_code=True)
    image = Image.open(image_files["wide"])
    messages = [user(("image", image), "Describe the image.")]
    output = pipe(text=messages, generate_kwargs=GREEDY, return_full_text=False)
    pixel_values = load_image(image_files["wide"], max_num=6)
    assert output[0]["generated_text"].strip() == tiny_model.chat(
        tokenizer, pixel_values, "Describe the image.", GREEDY
    )


def test_the_processor_makes_a_right_padding_tokenizer_pad_on_the_left(processor):
    """As the released checkpoint's tokenizer config does (it names no side); pipelines pad with this side."""
    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer.padding_side = "right"
    rebuilt = type(processor)(processor.image_processor, tokenizer)
    batch = rebuilt.tokenizer(["Hi", "Hello there, how are you?"], padding=True)
    assert batch.attention_mask[0][0] == 0 and batch.attention_mask[0][-1] == 1


def test_a_batched_pipeline_answers_conversations_of_different_lengths_as_chat_does(
    tiny_checkpoint, tiny_model, tokenizer, image_files
):
    """batch_size 2 pads the shorter prompt, on the left, where generation continues it."""
    pipe = pipeline("image-text-to-text", model=str(tiny_checkpoint), trust_remote_code=True)
    questions = {"square": "What is it?", "wide": "Describe the image in a few words, please."}
    conversations = [[user(("image", Image.open(image_files[name])), question)] for name, question in questions.items()]
    outputs = pipe(text=conversations, batch_size=2, generate_kwargs=GREEDY, return_full_text=False)
    expected = [
        tiny_model.chat(tokenizer, load_image(image_files[name], max_num=6), question, GREEDY)
        for name, question in questions.items()
    ]
    assert [output[0]["generated_text"].strip() for output in outputs] == expected


# -- bad input ---------------------------------------------------------------------------------------------------


def test_more_placeholders_than_images_is_rejected(processor):
    with pytest.raises(ValueError, match="<image>"):
        processor(text="<image>\n<image>\nCompare.", images=[Image.new("RGB", (64, 64))])


def test_a_generation_setting_given_to_the_processor_is_refused_naming_where_it_goes(processor):
    """`pipeline(..., do_sample=False)` hands do_sample to the processor, which cannot apply it."""
    with pytest.raises(ValueError, match=r"generate_kwargs=\{'do_sample': False\}"):
        render(processor, [user("Hello")], do_sample=False)


def test_a_url_is_not_downloaded_and_says_so(processor):
    with pytest.raises(FileNotFoundError, match="URLs are not downloaded"):
        render(processor, [user(("image", "https://example.com/cat.png"), "Describe.")])


def test_a_normalisation_other_than_imagenets_is_rejected():
    from nvlm_d.image_processing_nvlm_d import NVLM_D_ImageProcessor

    with pytest.raises(ValueError, match="ImageNet mean"):
        NVLM_D_ImageProcessor(image_mean=[0.5, 0.5, 0.5])


def test_resizing_settings_the_card_does_not_have_are_rejected(processor):
    with pytest.raises(ValueError, match="does not take"):
        processor.image_processor(Image.new("RGB", (64, 64)), size={"height": 224, "width": 224})
