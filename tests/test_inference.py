"""generate, chat, batch_chat and streaming on the tiny checkpoint, loaded through trust_remote_code."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import GenerationConfig, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from nvlm_d.conversation import build_prompt

GREEDY = {"max_new_tokens": 12, "do_sample": False}
IM_END = 151645


def tiles(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


def prompt_ids(tokenizer, question: str, num_patches_list=()) -> torch.Tensor:
    return tokenizer(build_prompt(question, num_patches_list), return_tensors="pt").input_ids


def test_greedy_chat_gives_the_same_answer_with_and_without_the_kv_cache(tiny_model, tokenizer):
    pixel_values = tiles(3)
    cached = tiny_model.chat(tokenizer, pixel_values, "Describe the image.", {**GREEDY, "use_cache": True})
    uncached = tiny_model.chat(tokenizer, pixel_values, "Describe the image.", {**GREEDY, "use_cache": False})
    assert cached == uncached
    assert cached


def test_generate_returns_only_the_new_tokens(tiny_model, tokenizer):
    input_ids = prompt_ids(tokenizer, "Hello, who are you?")
    output = tiny_model.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False)
    assert output.shape == (1, 5)


def test_generate_stops_at_im_end(tiny_model, tokenizer):
    input_ids = prompt_ids(tokenizer, "Hello")
    first = tiny_model.generate(input_ids=input_ids, max_new_tokens=1, do_sample=False)[0, 0].item()
    stopped = tiny_model.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False, eos_token_id=first)
    assert stopped.tolist() == [[first]]


def test_generate_with_images_matches_a_manual_greedy_loop_over_forward(tiny_model, tokenizer):
    pixel_values = tiles(2, seed=1)
    input_ids = prompt_ids(tokenizer, "What is it?", [2])
    generated = tiny_model.generate(pixel_values=pixel_values, input_ids=input_ids, max_new_tokens=4, do_sample=False)
    sequence = input_ids
    with torch.no_grad():
        for _ in range(4):
            logits = tiny_model(pixel_values=pixel_values, input_ids=sequence).logits
            sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
    assert generated.tolist() == sequence[:, input_ids.shape[1] :].tolist()


def test_visual_features_skip_the_vision_tower_and_give_the_same_answer(tiny_model, tokenizer):
    pixel_values = tiles(2, seed=2)
    expected = tiny_model.chat(tokenizer, pixel_values, "Describe.", GREEDY)
    with torch.no_grad():
        visual_features = tiny_model.get_visual_features(pixel_values)
    calls = []
    hook = tiny_model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        answer = tiny_model.chat(tokenizer, None, "Describe.", GREEDY, visual_features=visual_features)
    finally:
        hook.remove()
    assert answer == expected
    assert calls == []


@pytest.mark.parametrize(
    "settings",
    [
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50},
        {"num_beams": 3},
        {"repetition_penalty": 1.3},
        {"do_sample": False, "no_repeat_ngram_size": 2},
    ],
    ids=["sampling", "beam-search", "repetition-penalty", "no-repeat-ngram"],
)
def test_generation_strategies_work_through_chat(tiny_model, tokenizer, settings):
    torch.manual_seed(0)
    answer = tiny_model.chat(tokenizer, tiles(1), "Describe.", {"max_new_tokens": 6, **settings})
    assert isinstance(answer, str)


def test_sampling_is_reproducible_under_a_seed(tiny_model, tokenizer):
    settings = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0}
    torch.manual_seed(123)
    first = tiny_model.chat(tokenizer, None, "Tell me a story.", settings)
    torch.manual_seed(123)
    assert tiny_model.chat(tokenizer, None, "Tell me a story.", settings) == first


def test_stop_strings_end_the_answer(tiny_model, tokenizer):
    full = tiny_model.chat(tokenizer, None, "Hello, who are you?", {**GREEDY, "max_new_tokens": 20})
    tokens = tokenizer(full, add_special_tokens=False).input_ids
    stop = tokenizer.decode(tokens[2:3])
    stopped = tiny_model.chat(
        tokenizer, None, "Hello, who are you?", {**GREEDY, "max_new_tokens": 20, "stop_strings": [stop]}
    )
    assert stopped.endswith(stop.strip())
    assert len(stopped) < len(full)


def test_a_generation_config_object_is_accepted_and_left_unchanged(tiny_model, tokenizer):
    config = GenerationConfig(max_new_tokens=5, do_sample=False)
    before = config.to_dict()
    answer = tiny_model.chat(tokenizer, None, "Hello", config)
    assert answer == tiny_model.chat(tokenizer, None, "Hello", {"max_new_tokens": 5, "do_sample": False})
    assert config.to_dict() == before


def test_the_callers_generation_config_dict_is_not_mutated(tiny_model, tokenizer):
    settings = dict(GREEDY)
    tiny_model.chat(tokenizer, None, "Hello", settings)
    assert settings == GREEDY


def test_return_history_appends_the_turn_and_leaves_the_callers_history_alone(tiny_model, tokenizer):
    history = [("<image>\nWhat is it?", "A car.")]
    answer, new_history = tiny_model.chat(
        tokenizer, tiles(2), "What colour is it?", GREEDY, history=history, return_history=True
    )
    assert new_history == [*history, ("What colour is it?", answer)]
    assert history == [("<image>\nWhat is it?", "A car.")]


def test_first_image_question_is_stored_with_its_placeholder(tiny_model, tokenizer):
    answer, history = tiny_model.chat(tokenizer, tiles(1), "What is it?", GREEDY, return_history=True)
    assert history == [("<image>\nWhat is it?", answer)]
    # the next round re-expands the stored placeholder from the same pixel_values
    tiny_model.chat(tokenizer, tiles(1), "And then?", GREEDY, history=history)


def test_streamer_yields_exactly_the_returned_response(tiny_model, tokenizer):
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(
            answer=tiny_model.chat(tokenizer, tiles(1), "Describe.", GREEDY, streamer=streamer)
        )
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed.strip() == result["answer"]


class RecordingStreamer(BaseStreamer):
    """Keeps what generate streams: the prompt first, then the new tokens."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True

    def new_text(self, tokenizer) -> str:
        new_tokens = [token for chunk in self.chunks[1:] for token in chunk]
        return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def test_a_streamer_in_the_settings_streams_the_answer_of_chat_batch_chat_and_a_session(tiny_model, tokenizer):
    settings = {"max_new_tokens": 3, "do_sample": False}
    streamers = [RecordingStreamer() for _ in range(3)]
    answers = [
        tiny_model.chat(tokenizer, None, "Hi", {**settings, "streamer": streamers[0]}),
        tiny_model.batch_chat(tokenizer, None, ["Hi"], {**settings, "streamer": streamers[1]})[0],
        tiny_model.start_chat(tokenizer, {**settings, "streamer": streamers[2]}).ask("Hi"),
    ]
    assert [streamer.new_text(tokenizer) for streamer in streamers] == answers
    assert all(streamer.ended for streamer in streamers)


def test_two_different_streamers_for_one_answer_are_rejected(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="Two streamers"):
        tiny_model.chat(
            tokenizer, None, "Hi", {"max_new_tokens": 2, "streamer": RecordingStreamer()}, streamer=RecordingStreamer()
        )


def test_batch_chat_answers_equal_separate_chat_answers(tiny_model, tokenizer):
    questions = ["Hello, who are you?", "Describe this picture in a few words, please.", "What is it?"]
    image_a, image_c = tiles(3, seed=4), tiles(1, seed=5)
    separate = [
        tiny_model.chat(tokenizer, image_a, questions[0], GREEDY),
        tiny_model.chat(tokenizer, None, questions[1], GREEDY),
        tiny_model.chat(tokenizer, image_c, questions[2], GREEDY),
    ]
    batched = tiny_model.batch_chat(
        tokenizer, torch.cat([image_a, image_c]), questions, GREEDY, num_patches_list=[3, 0, 1]
    )
    assert batched == separate


def decoder_input_shapes(model) -> tuple[list[tuple[int, int]], object]:
    """(batch, tokens) of every decoder call, and the hook's handle."""
    shapes: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        shapes.append(tuple(kwargs["inputs_embeds"].shape[:2]))

    return shapes, model.language_model.register_forward_pre_hook(record, with_kwargs=True)


def test_batch_chat_prefills_prompts_of_different_lengths_one_by_one_then_decodes_them_together(tiny_model, tokenizer):
    """A left-padded prefill attends through a mask over every row padded to the longest (3x the rows' own prefills
    for 1- to 13-tile prompts on CPU): each prompt but its last token is prefilled alone, as `chat` does, and the
    rows' last tokens and the decoding run as one batch."""
    questions = ["<image>\nWhat is it?", "Hi?", "Tell me a story about the sea, please."]
    image = tiles(2, seed=8)
    lengths = [prompt_ids(tokenizer, questions[0], [2]).shape[1]]
    lengths += [prompt_ids(tokenizer, question).shape[1] for question in questions[1:]]
    shapes, hook = decoder_input_shapes(tiny_model)
    try:
        batched = tiny_model.batch_chat(tokenizer, image, questions, GREEDY, num_patches_list=[2, 0, 0])
    finally:
        hook.remove()
    assert shapes[:3] == [(1, length - 1) for length in lengths]
    assert shapes[3:] and all(shape == (3, 1) for shape in shapes[3:])
    assert batched == [
        tiny_model.chat(tokenizer, image, questions[0], GREEDY),
        tiny_model.chat(tokenizer, None, questions[1], GREEDY),
        tiny_model.chat(tokenizer, None, questions[2], GREEDY),
    ]


def test_batch_chat_prefills_prompts_of_equal_length_and_beam_searches_as_one_padded_batch(tiny_model, tokenizer):
    shapes, hook = decoder_input_shapes(tiny_model)
    try:
        tiny_model.batch_chat(tokenizer, None, ["Hi?", "Yo?"], GREEDY)
        equal_lengths = list(shapes)
        shapes.clear()
        tiny_model.batch_chat(tokenizer, None, ["Hi?", "Tell me a story."], {**GREEDY, "num_beams": 2})
    finally:
        hook.remove()
    assert equal_lengths[0][0] == 2 and equal_lengths[0][1] > 1
    assert shapes[0][0] == 4 and shapes[0][1] > 1  # 2 prompts x 2 beams, prefilled together


def test_batch_chat_without_a_cache_answers_prompts_of_different_lengths_as_chat_does(tiny_model, tokenizer):
    settings = {"max_new_tokens": 4, "do_sample": False, "use_cache": False}
    questions = ["Hi?", "Tell me a story about the sea, please."]
    separate = [tiny_model.chat(tokenizer, None, question, settings) for question in questions]
    assert tiny_model.batch_chat(tokenizer, None, questions, settings) == separate


def test_batch_chat_accepts_several_images_for_one_question(tiny_model, tokenizer):
    first, second = tiles(2, seed=6), tiles(1, seed=7)
    question = "Image-1: <image>\nImage-2: <image>\nCompare them."
    expected = tiny_model.chat(tokenizer, torch.cat([first, second]), question, GREEDY, num_patches_list=[2, 1])
    batched = tiny_model.batch_chat(
        tokenizer, torch.cat([first, second]), [question, "Hi"], GREEDY, num_patches_list=[[2, 1], 0]
    )
    assert batched[0] == expected


def test_chat_without_sys_prompt_builds_a_prompt_without_a_system_turn(tiny_model, tokenizer, caplog):
    tiny_model.chat_without_sys_prompt(tokenizer, None, "Hello, who are you?", GREEDY, verbose=True)
    assert "<|im_start|>user\nHello, who are you?<|im_end|><|im_start|>assistant\n" in caplog.text
    assert "system" not in caplog.text.split("NVLM-D prompt")[1].split("NVLM-D response")[0]


def test_chat_without_chat_prompt_completes_the_bare_question(tiny_model, tokenizer):
    expected_ids = tokenizer(build_prompt("Describe.", [1], mode="raw"), return_tensors="pt").input_ids
    expected = tiny_model.generate(pixel_values=tiles(1), input_ids=expected_ids, **GREEDY)
    answer = tiny_model.chat_without_chat_prompt(tokenizer, tiles(1), "Describe.", GREEDY)
    assert answer == tokenizer.decode(expected[0], skip_special_tokens=True).split("<|im_end|>")[0].strip()


def test_verbose_logs_the_prompt_without_printing(tiny_model, tokenizer, caplog, capsys):
    tiny_model.chat(tokenizer, tiles(1), "Describe.", GREEDY, verbose=True)
    assert "<Image><tile_global_thumbnail></Image>\nDescribe." in caplog.text
    assert capsys.readouterr().out == ""


# -- bad input ---------------------------------------------------------------------------------------------------


def test_question_none_is_a_type_error(tiny_model, tokenizer):
    with pytest.raises(TypeError, match="question must be a string"):
        tiny_model.chat(tokenizer, None, None, GREEDY)


def test_empty_question_is_rejected(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="question is empty"):
        tiny_model.chat(tokenizer, None, "   ", GREEDY)


def test_empty_question_with_an_image_is_rejected_by_chat_batch_chat_and_sessions(tiny_model, tokenizer):
    """chat puts `<image>\n` in front of it, which must not make it a question."""
    with pytest.raises(ValueError, match="question is empty"):
        tiny_model.chat(tokenizer, tiles(1), "", GREEDY)
    with pytest.raises(ValueError, match="question is empty"):
        tiny_model.batch_chat(tokenizer, tiles(2), ["Describe.", " \n"], GREEDY, num_patches_list=[1, 1])
    with pytest.raises(ValueError, match="question is empty"):
        tiny_model.start_chat(tokenizer, GREEDY).ask("", tiles(1))


@pytest.mark.parametrize("settings", [{"temperature": 0.7}, GenerationConfig(top_p=0.9, max_new_tokens=4)])
def test_sampling_settings_without_do_sample_are_refused_naming_the_fix(tiny_model, tokenizer, settings):
    with pytest.raises(ValueError, match="do_sample=True to sample, or do_sample=False"):
        tiny_model.chat(tokenizer, None, "Hello", settings)


def test_sampling_settings_with_do_sample_false_answer_greedily(tiny_model, tokenizer):
    """How evaluation harnesses call chat (e.g. temperature 0 with do_sample False)."""
    answer = tiny_model.chat(tokenizer, None, "Hello", {**GREEDY, "temperature": 0.0, "top_p": None})
    assert answer == tiny_model.chat(tokenizer, None, "Hello", GREEDY)


def test_pixel_values_of_the_wrong_shape_are_rejected_by_chat(tiny_model, tokenizer):
    with pytest.raises(
        ValueError, match=r"pixel_values must have shape \[num_tiles, 3, 448, 448\], got \[3, 448, 448\]"
    ):
        tiny_model.chat(tokenizer, torch.randn(3, 448, 448), "Describe.", GREEDY)


def test_pixel_values_that_are_not_a_tensor_are_rejected(tiny_model, tokenizer):
    with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor"):
        tiny_model.chat(tokenizer, [[0.0]], "Describe.", GREEDY)


def test_num_patches_list_that_does_not_sum_to_the_tiles_is_rejected(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="sums to 4 tiles but pixel_values holds 3 tiles"):
        tiny_model.chat(tokenizer, tiles(3), "<image> <image>", GREEDY, num_patches_list=[2, 2])


@pytest.mark.parametrize(
    "question, placeholders",
    [("<image>\n<image>\n<image>\nCompare.", 3), ("<image>\nOnly one placeholder.", 1)],
    ids=["more-placeholders", "fewer-placeholders"],
)
def test_placeholders_that_do_not_match_the_images_are_rejected(tiny_model, tokenizer, question, placeholders):
    with pytest.raises(ValueError, match=rf"{placeholders} <image> placeholder\(s\) but 2 image\(s\)"):
        tiny_model.chat(tokenizer, tiles(2), question, GREEDY, num_patches_list=[1, 1])


@pytest.mark.parametrize("history", ["not a list", [("only a question",)], [(1, 2)], [["q", None]]])
def test_malformed_history_is_rejected(tiny_model, tokenizer, history):
    with pytest.raises(TypeError, match="history"):
        tiny_model.chat(tokenizer, None, "Hello", GREEDY, history=history)


def test_generation_config_of_the_wrong_type_is_rejected(tiny_model, tokenizer):
    with pytest.raises(TypeError, match="generation_config"):
        tiny_model.chat(tokenizer, None, "Hello", "greedy")


def test_image_tokens_without_images_are_rejected_by_generate(tiny_model, tokenizer):
    input_ids = prompt_ids(tokenizer, "Describe.", [1])
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model.generate(input_ids=input_ids, max_new_tokens=2)


def test_batch_chat_needs_to_know_which_tiles_belong_to_which_question(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="num_patches_list"):
        tiny_model.batch_chat(tokenizer, tiles(2), ["a", "b"], GREEDY)
    with pytest.raises(ValueError, match="one entry per question"):
        tiny_model.batch_chat(tokenizer, tiles(2), ["a", "b"], GREEDY, num_patches_list=[2])


def test_several_images_without_placeholders_say_that_chat_added_one(tiny_model, tokenizer):
    with pytest.raises(ValueError, match=r"chat put one <image> in front of the question \(it had none\) but 2 images"):
        tiny_model.chat(tokenizer, tiles(2), "Compare them.", GREEDY, num_patches_list=[1, 1])


def test_a_follow_up_without_pixel_values_says_to_pass_the_same_images_again(tiny_model, tokenizer):
    history = [("<image>\nWhat is it?", "A car.")]
    with pytest.raises(ValueError, match="pass the same pixel_values"):
        tiny_model.chat(tokenizer, None, "What colour is it?", GREEDY, history=history)


def test_num_patches_list_accepts_numpy_integers(tiny_model, tokenizer):
    np = pytest.importorskip("numpy")
    counts = list(np.array([2, 1]))
    question = "Image-1: <image>\nImage-2: <image>\nCompare."
    expected = tiny_model.chat(tokenizer, tiles(3), question, GREEDY, num_patches_list=[2, 1])
    assert tiny_model.chat(tokenizer, tiles(3), question, GREEDY, num_patches_list=counts) == expected
    assert tiny_model.batch_chat(tokenizer, tiles(3), [question], GREEDY, num_patches_list=[counts]) == [expected]
