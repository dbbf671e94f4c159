"""`nvlm_d.training.finetune`: the options of a run are checked when made, before anything is loaded."""

from __future__ import annotations

import re

import pytest

from nvlm_d.training.finetune import FinetuneOptions


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"qlora": True}, "give --lora R too"),
        ({"freeze": ["vision", "decoder"]}, "unknown parts ['decoder']"),
        ({"lora": 0}, "--lora must be an integer >= 1"),
        ({"deepspeed": "zero3", "fsdp": "fsdp2"}, "choose one"),
        ({"epochs": float("inf")}, "--epochs must be a number > 0"),
    ],
)
def test_options_that_cannot_run_are_a_value_error_naming_the_option(conversations_file, tmp_path, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FinetuneOptions(model="m", data=str(conversations_file), output=str(tmp_path), **settings)


def test_a_missing_data_file_is_named_when_the_options_are_made(tmp_path):
    with pytest.raises(ValueError, match="--data .*none.jsonl: no such file"):
        FinetuneOptions(model="m", data=str(tmp_path / "none.jsonl"), output=str(tmp_path))
