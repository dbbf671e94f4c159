"""transformers' `pipeline("text-generation")` over NVLM-D (registered for `AutoModelForCausalLM`): it cuts the
prompt's length off what `generate` returns, so it must get whole sequences, not the new tokens other callers get."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, pipeline

SETTINGS = {"max_new_tokens": 3, "do_sample": False}


@pytest.fixture(scope="module")
def text_pipeline(tiny_model, tiny_checkpoint):
    # its own tokenizer: the pipeline sets padding_side on the one it is given
    return pipeline("text-generation", model=tiny_model, tokenizer=AutoTokenizer.from_pretrained(tiny_checkpoint))


def test_text_generation_pipeline_answers_chat_messages_as_chat_does(text_pipeline, tiny_model, tokenizer):
    (output,) = text_pipeline([{"role": "user", "content": "Hi"}], **SETTINGS)
    answer = output["generated_text"][-1]
    assert answer["role"] == "assistant"
    assert answer["content"].strip() == tiny_model.chat(tokenizer, None, "Hi", SETTINGS)
    assert answer["content"].strip()


def test_text_generation_pipeline_completes_a_plain_prompt_with_the_new_tokens(text_pipeline, tiny_model, tokenizer):
    prompt = "The capital of France is"
    (output,) = text_pipeline(prompt, return_full_text=False, **SETTINGS)
    new_tokens = tiny_model.generate(input_ids=tokenizer(prompt, return_tensors="pt").input_ids, **SETTINGS)
    assert output["generated_text"] == tokenizer.decode(new_tokens[0], skip_special_tokens=True) != ""
