"""NVLM-D's prompt text: the chatml template, the 1-D tile tags and the placement of images.

Each expected string is written out here from NVLM's rules (system `<|im_start|>system\\n...<|im_end|>`, no newline
after `<|im_end|>`, `<Image>`, tile tags each followed by 256 `<|vision_pad|>`, `</Image>`), and the reference's
own prompts (../shared/reference/nvlm_d_72b_chat_prompts.json) are an independent check.
"""

from __future__ import annotations

import json

import pytest

from nvlm_d.conversation import build_prompt, get_conv_template, image_prompt, tile_tags

PAD = "<|vision_pad|>"
SYSTEM = "<|im_start|>system\nAnswer the questions.<|im_end|>"
ASSISTANT = "<|im_start|>assistant\n"


def user(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>"


def tagged(*tags: str) -> str:
    return "<Image>" + "".join(tag + PAD * 256 for tag in tags) + "</Image>"


SEVEN_TILES = tagged(*(f"<tile_{k}>" for k in range(1, 7)), "<tile_global_thumbnail>")
ONE_TILE = tagged("<tile_global_thumbnail>")


def test_text_only_question():
    assert build_prompt("Hello, who are you?") == SYSTEM + user("Hello, who are you?") + ASSISTANT


def test_one_image_of_seven_tiles_is_put_in_front_of_the_question():
    expected = SYSTEM + user(SEVEN_TILES + "\nPlease describe the image shortly.") + ASSISTANT
    assert build_prompt("Please describe the image shortly.", [7]) == expected


def test_single_tile_image_is_tagged_as_thumbnail():
    expected = SYSTEM + user(ONE_TILE + "\nPlease describe the image shortly.") + ASSISTANT
    assert build_prompt("Please describe the image shortly.", [1]) == expected


def test_two_images_replace_their_placeholders_in_order():
    question = "Image-1: <image>\nImage-2: <image>\nDescribe the two images."
    expected = SYSTEM + user(f"Image-1: {SEVEN_TILES}\nImage-2: {ONE_TILE}\nDescribe the two images.") + ASSISTANT
    assert build_prompt(question, [7, 1]) == expected


def test_multi_turn_history_is_concatenated_without_newlines_between_turns():
    history = [("Hello, who are you?", "I am an AI assistant.")]
    expected = (
        SYSTEM
        + user("Hello, who are you?")
        + ASSISTANT
        + "I am an AI assistant.<|im_end|>"
        + user("What can you do?")
        + ASSISTANT
    )
    assert build_prompt("What can you do?", history=history) == expected


def test_an_image_kept_in_the_history_is_expanded_in_the_first_turn():
    history = [("<image>\nPlease describe the image shortly.", "A red car.")]
    expected = (
        SYSTEM
        + user(SEVEN_TILES + "\nPlease describe the image shortly.")
        + ASSISTANT
        + "A red car.<|im_end|>"
        + user("What colour is it?")
        + ASSISTANT
    )
    assert build_prompt("What colour is it?", [7], history=history) == expected


def test_no_placeholder_is_added_when_there_is_a_history():
    history = [("<image>\nWhat is it?", "A car.")]
    assert build_prompt("And now?", [1], history=history).count("<Image>") == 1


def test_raw_mode_is_the_question_with_its_images_expanded():
    assert build_prompt("Describe.", [1], mode="raw") == ONE_TILE + "\nDescribe."


def test_no_system_mode_has_no_system_turn():
    assert build_prompt("Hello, who are you?", mode="no_system") == user("Hello, who are you?") + ASSISTANT


def test_system_message_can_be_replaced():
    assert build_prompt("Hi", system_message="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_tile_tags_number_the_tiles_and_end_with_the_thumbnail():
    assert tile_tags(1) == ["<tile_global_thumbnail>"]
    assert tile_tags(3) == ["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"]


def test_image_prompt_has_256_context_tokens_per_tile():
    assert image_prompt(7).count(PAD) == 7 * 256
    assert (
        image_prompt(2, num_image_token=4, context_token="X")
        == "<Image><tile_1>XXXX<tile_global_thumbnail>XXXX</Image>"
    )


def test_conversation_template_is_a_fresh_copy_each_time():
    first = get_conv_template("chatml")
    first.append_message(first.roles[0], "Hello")
    assert get_conv_template("chatml").messages == []


@pytest.mark.parametrize(
    "case, question, num_patches_list, history, mode",
    [
        ("text_only", "Hello, who are you?", [], None, "chat"),
        ("one_image_7_tiles", "Please describe the image shortly.", [7], None, "chat"),
        ("one_image_1_tile", "Please describe the image shortly.", [1], None, "chat"),
        (
            "two_images_7_and_1_tiles",
            "Image-1: <image>\nImage-2: <image>\nDescribe the two images.",
            [7, 1],
            None,
            "chat",
        ),
        ("multi_turn_text", "What can you do?", [], [("Hello, who are you?", "I am an AI assistant.")], "chat"),
        (
            "multi_turn_image_second_round",
            "What colour is it?",
            [7],
            [("<image>\nPlease describe the image shortly.", "A red car.")],
            "chat",
        ),
        ("chat_without_chat_prompt_1_tile", "Describe.", [1], None, "raw"),
    ],
)
def test_prompts_equal_the_reference_chats(reference_dir, case, question, num_patches_list, history, mode):
    cases = json.loads((reference_dir / "nvlm_d_72b_chat_prompts.json").read_text())["cases"]
    assert build_prompt(question, num_patches_list, history, mode=mode) == cases[case]["prompt"]


# -- bad input ---------------------------------------------------------------------------------------------------


def test_more_images_than_placeholders_names_both_counts():
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 2 image\(s\)"):
        build_prompt("<image>\nCompare.", [1, 1])


def test_fewer_images_than_placeholders_names_both_counts():
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image\(s\)"):
        build_prompt("<image> and <image>", [3])


def test_placeholder_without_any_image_is_rejected():
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 0 image\(s\)"):
        build_prompt("What is in <image>?")


def test_unknown_template_is_rejected():
    with pytest.raises(ValueError, match="Unknown conversation template 'vicuna'"):
        build_prompt("Hi", template="vicuna")


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        build_prompt("Hi", mode="plain")


@pytest.mark.parametrize("question", [None, 3, b"Hi"])
def test_question_that_is_not_a_string_is_a_type_error(question):
    with pytest.raises(TypeError, match="question must be a string"):
        build_prompt(question)
