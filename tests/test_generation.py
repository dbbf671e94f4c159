"""transformers' generation features through `generate` and `chat`: the image features enter in `forward`, so the
library's own loop runs unchanged (inferred attention masks, several sequences, assisted decoding, processors)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from nvlm_d.conversation import build_prompt
from nvlm_d.tiny import build_tiny_model, tiny_config

GREEDY = {"max_new_tokens": 8, "do_sample": False}


def tiles(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def transformers_warnings():
    """Warnings transformers logs (its loggers do not propagate to the root logger; `warning_once` remembers)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    hf_logging.get_logger("transformers").warning_once.cache_clear()
    yield records
    library_logger.removeHandler(handler)


def left_padded(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    return batch.input_ids, batch.attention_mask


def test_left_padded_generate_without_an_attention_mask_equals_generate_with_it(tiny_model, tokenizer):
    input_ids, attention_mask = left_padded(tokenizer, [build_prompt("Hi"), build_prompt("Describe a long river.")])
    assert (attention_mask == 0).any()
    with_mask = tiny_model.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY)
    without_mask = tiny_model.generate(input_ids=input_ids, **GREEDY)
    assert torch.equal(without_mask, with_mask)


def test_generate_returns_the_new_tokens_also_in_a_dict_output(tiny_model, tokenizer):
    input_ids = tokenizer(build_prompt("Hello"), return_tensors="pt").input_ids
    output = tiny_model.generate(input_ids=input_ids, return_dict_in_generate=True, output_scores=True, **GREEDY)
    assert output.sequences.shape == (1, GREEDY["max_new_tokens"])
    assert len(output.scores) == GREEDY["max_new_tokens"]


def test_chat_with_num_return_sequences_returns_that_many_answers(tiny_model, tokenizer):
    settings = {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 3, "do_sample": False}
    answers = tiny_model.chat(tokenizer, tiles(1), "Describe.", settings)
    assert isinstance(answers, list) and len(answers) == 3
    assert answers[0] == tiny_model.chat(tokenizer, tiles(1), "Describe.", {**settings, "num_return_sequences": 1})


def test_batch_chat_with_num_return_sequences_returns_a_list_per_question(tiny_model, tokenizer):
    settings = {"max_new_tokens": 6, "do_sample": True, "num_return_sequences": 3}
    torch.manual_seed(0)
    answers = tiny_model.batch_chat(tokenizer, tiles(2), ["Describe.", "Hi"], settings, num_patches_list=[2, 0])
    assert [len(group) for group in answers] == [3, 3]
    assert all(isinstance(answer, str) for group in answers for answer in group)


def test_return_history_with_several_answers_asks_the_caller_to_choose(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="one answer per turn"):
        tiny_model.chat(
            tokenizer,
            None,
            "Hi",
            {"do_sample": True, "num_return_sequences": 2, "max_new_tokens": 2},
            return_history=True,
        )


@pytest.mark.parametrize("draft", ["nvlm-d", "qwen2"])
def test_assisted_decoding_with_a_tiny_assistant_gives_the_greedy_answer(tiny_model, tokenizer, draft):
    # another NVLM-D (it reads the same images), or a text-only Qwen2 with the same vocabulary
    assistant = build_tiny_model(seed=5) if draft == "nvlm-d" else Qwen2ForCausalLM(tiny_config().llm_config)
    pixel_values = tiles(2, seed=1)
    greedy = tiny_model.chat(tokenizer, pixel_values, "Describe.", GREEDY)
    assisted = tiny_model.chat(tokenizer, pixel_values, "Describe.", {**GREEDY, "assistant_model": assistant.eval()})
    assert assisted == greedy


def test_chat_with_a_generation_config_object_logs_no_warning(tiny_model, tokenizer, transformers_warnings):
    config = GenerationConfig(max_new_tokens=4, do_sample=False)
    tiny_model.chat(tokenizer, tiles(1), "Describe.", config)
    tiny_model.chat(tokenizer, None, "Hello", {"max_new_tokens": 4, "do_sample": False})
    assert [record.getMessage() for record in transformers_warnings] == []


@pytest.mark.parametrize("as_object", [False, True], ids=["dict", "GenerationConfig"])
def test_the_callers_eos_token_id_wins(tiny_model, tokenizer, as_object):
    input_ids = tokenizer(build_prompt("Hello, who are you?"), return_tensors="pt").input_ids
    first, second = tiny_model.generate(input_ids=input_ids, max_new_tokens=2, do_sample=False)[0].tolist()
    settings = {**GREEDY, "eos_token_id": second}
    stopped = tiny_model.chat(
        tokenizer, None, "Hello, who are you?", GenerationConfig(**settings) if as_object else settings
    )
    assert stopped == tokenizer.decode([first, second]).strip()


def test_a_logits_processor_in_the_settings_is_applied(tiny_model, tokenizer):
    class ForceToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -float("inf"))
            forced[:, 9707] = 0  # "Hello"
            return forced

    answer = tiny_model.chat(tokenizer, None, "Hi", {"max_new_tokens": 3, "logits_processor": [ForceToken()]})
    assert answer == "HelloHelloHello"


@pytest.mark.parametrize("setting", [{"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}])
def test_chat_applies_penalties_to_the_generated_tokens_only_as_the_reference(tiny_model, tokenizer, setting):
    """The reference generated from the merged prompt embeddings, so its processors never saw the prompt's ids:
    transformers' own generation from `inputs_embeds` is that oracle."""
    pixel_values = tiles(1, seed=2)
    settings = {"max_new_tokens": 12, "do_sample": False, **setting}
    answer = tiny_model.chat(tokenizer, pixel_values, "Describe the picture.", settings)
    input_ids = tokenizer(build_prompt("Describe the picture.", [1]), return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = tiny_model.merge_image_features(
            input_ids, tiny_model.get_input_embeddings()(input_ids), tiny_model.extract_feature(pixel_values)
        )
    reference = tiny_model.language_model.generate(
        inputs_embeds=embeds, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), **settings
    )
    assert answer == tokenizer.decode(reference[0], skip_special_tokens=True).strip()


def test_get_image_features_pools_the_features_extract_feature_returns(tiny_model):
    pixel_values = tiles(2, seed=3)
    with torch.no_grad():
        output = tiny_model.get_image_features(pixel_values)
        torch.testing.assert_close(output.pooler_output, tiny_model.extract_feature(pixel_values))
    assert output.last_hidden_state.shape == (2, 1025, tiny_model.config.vision_config.hidden_size)


def test_visual_features_are_what_get_visual_features_returns(tiny_model, tokenizer):
    pixel_values = tiles(1, seed=4)
    with torch.no_grad():
        visual_features = tiny_model.get_visual_features(pixel_values)
    assert visual_features.shape == (1, 256, tiny_model.mlp1[0].normalized_shape[0])
    input_ids = tokenizer(build_prompt("Describe.", [1]), return_tensors="pt").input_ids
    from_pixels = tiny_model.generate(pixel_values=pixel_values, input_ids=input_ids, **GREEDY)
    from_features = tiny_model.generate(visual_features=visual_features, input_ids=input_ids, **GREEDY)
    assert torch.equal(from_features, from_pixels)


def test_internvl_style_code_may_set_the_image_token_id_it_already_has(tiny_model):
    tiny_model.img_context_token_id = 151654
    with pytest.raises(ValueError, match="151654"):
        tiny_model.img_context_token_id = 151667


def test_chat_does_not_change_the_model(tiny_model, tokenizer):
    before = (tiny_model.img_context_token_id, tiny_model.system_message, tiny_model.config.to_json_string())
    tiny_model.chat(tokenizer, tiles(1), "Describe.", GREEDY)
    assert (tiny_model.img_context_token_id, tiny_model.system_message, tiny_model.config.to_json_string()) == before


def test_a_different_image_context_token_is_rejected(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="IMG_CONTEXT_TOKEN"):
        tiny_model.chat(tokenizer, tiles(1), "Describe.", GREEDY, IMG_CONTEXT_TOKEN="<|image_pad|>")


def test_the_callers_pad_token_id_wins_and_other_settings_default_to_chats(tokenizer):
    from nvlm_d.chat_nvlm_d import _chat_generation_config

    config, extra = _chat_generation_config({"max_new_tokens": 3, "pad_token_id": 7}, tokenizer)
    assert (config.pad_token_id, config.eos_token_id, config.max_new_tokens) == (7, 151645, 3)
    config, _ = _chat_generation_config(GenerationConfig(max_new_tokens=3), tokenizer)
    assert (config.pad_token_id, config.eos_token_id) == (tokenizer.pad_token_id, 151645)
    assert extra == {}
