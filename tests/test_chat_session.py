"""`model.start_chat(...)`: follow-up turns prefill only their new tokens and answer as `chat(history=...)` does."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModel

GREEDY = {"max_new_tokens": 8, "do_sample": False}


def tiles(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


def chat_from_scratch(model, tokenizer, turns, settings=GREEDY):
    """The card's way: every turn rebuilds the prompt from the history and passes all images so far."""
    history, images, answers = None, [], []
    for question, new_images in turns:
        images.extend(new_images)
        pixel_values = torch.cat(images) if images else None
        num_patches = [len(image) for image in images] or None
        answer, history = model.chat(
            tokenizer,
            pixel_values,
            question,
            settings,
            history=history,
            return_history=True,
            num_patches_list=num_patches,
        )
        answers.append(answer)
    return answers


def session_answers(model, tokenizer, turns, settings=GREEDY):
    session = model.start_chat(tokenizer, settings)
    answers = []
    for question, new_images in turns:
        pixel_values = torch.cat(new_images) if new_images else None
        num_patches = [len(image) for image in new_images] or None
        answers.append(session.ask(question, pixel_values, num_patches_list=num_patches))
    return answers, session


TEXT_ONLY = [("Hello, who are you?", []), ("What can you do?", []), ("Tell me more.", []), ("Thanks!", [])]
ONE_IMAGE = [
    ("What is in the picture?", [tiles(3, seed=1)]),
    ("What colour is it?", []),
    ("Is it large?", []),
    ("Describe it again.", []),
]
TWO_IMAGES = [
    ("Image-1: <image>\nWhat is it?", [tiles(2, seed=2)]),
    ("And its size?", []),
    ("Image-2: <image>\nCompare it with the first image.", [tiles(1, seed=3)]),
    ("Which one do you prefer?", []),
]


@pytest.mark.parametrize("turns", [TEXT_ONLY, ONE_IMAGE, TWO_IMAGES], ids=["text-only", "one-image", "two-images"])
def test_four_turns_answer_as_chat_with_history_does(tiny_model, tokenizer, turns):
    answers, session = session_answers(tiny_model, tokenizer, turns)
    assert answers == chat_from_scratch(tiny_model, tokenizer, turns)
    assert [answer for _, answer in session.history] == answers


def test_a_follow_up_prefills_only_its_new_tokens(tiny_model, tokenizer):
    session = tiny_model.start_chat(tokenizer, GREEDY)
    session.ask("What is in the picture?", tiles(3, seed=1))
    cached_after_first = session.num_cached_tokens
    prefilled = []
    hook = tiny_model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: prefilled.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    vision_calls = []
    vision_hook = tiny_model.vision_model.register_forward_hook(lambda *args: vision_calls.append(1))
    try:
        session.ask("What colour is it?")
    finally:
        hook.remove()
        vision_hook.remove()
    assert vision_calls == []
    assert cached_after_first > 768  # the image's 3 tiles x 256 tokens stayed in the cache
    assert prefilled[0] < 40  # the new turn's tokens (and the previous answer's end), not the whole prompt


def test_sampling_in_a_session_is_reproducible_under_a_seed(tiny_model, tokenizer):
    settings = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0}
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(session_answers(tiny_model, tokenizer, ONE_IMAGE[:3], settings)[0])
    assert runs[0] == runs[1]


def test_a_turn_over_the_token_limit_is_refused_and_the_session_is_unchanged(tiny_model, tokenizer):
    session = tiny_model.start_chat(tokenizer, GREEDY, max_tokens=840)
    session.ask("What is in the picture?", tiles(3, seed=1))  # 808 prompt tokens + 8 new ones
    history, cached = list(session.history), session.num_cached_tokens
    with pytest.raises(ValueError, match="max_tokens=840.*reset"):
        session.ask("Please describe every detail of the picture once more, slowly, with all the colours and shapes.")
    assert session.history == history and session.num_cached_tokens == cached
    session.reset()
    assert session.history == [] and session.num_cached_tokens == 0
    assert session.ask("Hello") == tiny_model.chat(tokenizer, None, "Hello", GREEDY)


def test_beams_are_refused_with_a_reason(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="one sequence per turn"):
        tiny_model.start_chat(tokenizer, {"num_beams": 2})


def test_a_session_on_an_offloaded_model_answers_as_chat(tiny_checkpoint, tiny_model, tokenizer, tmp_path):
    device_map = {
        "vision_model": "disk",
        "mlp1": "cpu",
        "language_model.model.embed_tokens": "cpu",
        "language_model.model.rotary_emb": "cpu",
        "language_model.model.layers.0": "disk",
        "language_model.model.layers.1": "cpu",
        "language_model.model.norm": "cpu",
        "language_model.lm_head": "cpu",
    }
    offloaded = AutoModel.from_pretrained(
        tiny_checkpoint, trust_remote_code=True, dtype=torch.float32, device_map=device_map, offload_folder=tmp_path
    ).eval()
    answers, _ = session_answers(offloaded, tokenizer, ONE_IMAGE[:3])
    assert answers == chat_from_scratch(tiny_model, tokenizer, ONE_IMAGE[:3])


def test_a_popped_turn_asked_again_answers_as_chat_without_that_turn(tiny_model, tokenizer):
    turns = [("What is in the picture?", [tiles(1, seed=1)]), ("Image-2: <image>\nAnd this one?", [tiles(1, seed=2)])]
    _, session = session_answers(tiny_model, tokenizer, turns)
    question, _ = session.pop_turn()
    assert question == turns[1][0] and len(session.history) == 1
    again = session.ask("Image-2: <image>\nWhat colour is it?", tiles(1, seed=3))
    expected = chat_from_scratch(
        tiny_model, tokenizer, [turns[0], ("Image-2: <image>\nWhat colour is it?", [tiles(1, seed=3)])]
    )
    assert again == expected[1]


PENALISED = {"max_new_tokens": 8, "do_sample": False, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2}


def test_repetition_settings_see_only_the_answer_in_a_session_as_in_chat(tiny_model, tokenizer):
    answers, _ = session_answers(tiny_model, tokenizer, ONE_IMAGE[:2], PENALISED)
    assert answers == chat_from_scratch(tiny_model, tokenizer, ONE_IMAGE[:2], PENALISED)


def test_a_tokenizer_in_the_settings_serves_the_stop_strings_as_in_chat(tiny_model, tokenizer):
    question = TEXT_ONLY[0][0]
    unstopped = tiny_model.chat(tokenizer, None, question, GREEDY)
    stop = re.search(r"[A-Za-z]{4,}", unstopped).group()  # a word inside the random weights' answer
    settings = {**GREEDY, "stop_strings": [stop], "tokenizer": tokenizer}
    answer = tiny_model.start_chat(tokenizer, settings).ask(question)
    assert answer == tiny_model.chat(tokenizer, None, question, settings)
    assert answer.endswith(stop) and len(answer) < len(unstopped)


def cached_layers(session) -> list[torch.Tensor]:
    """Every layer's keys and values, in order."""
    return [tensor.clone() for layer in session._cache.layers for tensor in (layer.keys, layer.values)]


def out_of_memory(module, args, kwargs):
    """A forward pre-hook for decoder layer 1: layer 0 has stored this turn's keys and values, layer 1 not."""
    raise RuntimeError("simulated out of memory in layer 1")


def test_a_turn_that_fails_inside_a_layer_leaves_the_cache_as_it_was(tiny_model, tokenizer):
    session = tiny_model.start_chat(tokenizer, GREEDY)
    first = session.ask(TEXT_ONLY[0][0])
    before, cached = cached_layers(session), session.num_cached_tokens
    hook = tiny_model.language_model.model.layers[1].register_forward_pre_hook(out_of_memory, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            session.ask(TEXT_ONLY[1][0])
    finally:
        hook.remove()
    after = cached_layers(session)
    assert session.num_cached_tokens == cached and session.history == [(TEXT_ONLY[0][0], first)]
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    later = [session.ask(question) for question, _ in TEXT_ONLY[1:]]
    assert [first, *later] == session_answers(tiny_model, tokenizer, TEXT_ONLY)[0]


def test_a_first_turn_that_fails_inside_a_layer_leaves_an_empty_session(tiny_model, tokenizer):
    session = tiny_model.start_chat(tokenizer, GREEDY)
    hook = tiny_model.language_model.model.layers[1].register_forward_pre_hook(out_of_memory, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            session.ask("Hello")
    finally:
        hook.remove()
    assert session.history == [] and session.num_cached_tokens == 0
    assert all(layer.get_seq_length() == 0 for layer in session._cache.layers)
    assert session.ask("Hello") == tiny_model.chat(tokenizer, None, "Hello", GREEDY)
