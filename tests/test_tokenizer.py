"""The tokenizer files at the repository root: vocab.json, merges.txt, tokenizer.json, tokenizer_config.json.

tools/build_tokenizer.py generates them from the Qwen BPE ranks in dashscope's `qwen.tiktoken`. These tests pin them
to NVLM-D-72B's checkpoint: the same vocabulary and merges, the same ids as the checkpoint's own vocab.json +
merges.txt (the oracle) and as its golden prompts, Qwen2.5's tokenizer settings, and NVLM's chat template.

On transformers 5, `AutoTokenizer.from_pretrained(..., use_fast=False)` ignores `use_fast`: both loads give the same
tokenizers-backed `Qwen2Tokenizer` (transformers 5 has no pure-Python Qwen2 tokenizer). The checks with independent
inputs are the oracle, tokenizer.json read by the `tokenizers` library alone, and vocab.json + merges.txt loaded
without tokenizer.json.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from nvlm_d.conversation import CHAT_TEMPLATE, build_prompt, get_conv_template

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
NUM_BPE_TOKENS = 151_643

# Qwen2.5's added tokens, from id 151643 on: the first 14 are special, the last 8 are not.
ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

CORPUS = {
    "hello": "Hello world",
    "ascii_sentence": "The quick brown fox jumps over the lazy dog. It's 5 o'clock; isn't it?",
    "contractions_upper": "I'M SURE THEY'LL SAY WE'VE WON... she'd've",
    "punctuation": "!!! ??? ... --- ((nested)) [brackets] {braces} <angle> @#$%^&*_+=|\\/~`",
    "python_code": 'def f(x):\n    """Doc."""\n    if x > 0:\n\treturn {"a": [1, 2, 3]}\n    return None\n',
    "c_code_crlf": 'int main(void) {\r\n  printf("%d\\n", 42);\r\n  return 0;\r\n}\r\n',
    "json": '{"key": "value", "list": [1.5, -2e10, null, true]}',
    "url": "https://huggingface.co/nvidia/NVLM-D-72B?tab=files#readme",
    "latex": r"\frac{a}{b} = \sum_{i=1}^{n} x_i^2 \quad \text{and} \; \alpha\beta",
    "chinese": "请描述这张图片。图中有一辆红色的汽车停在路边。",
    "japanese": "これは日本語のテキストです。カタカナとひらがな、漢字。",
    "korean": "안녕하세요, 세계! 이미지를 설명해 주세요.",
    "mixed_scripts": "Привет мир · Γειά σου · مرحبا بالعالم · שלום · नमस्ते · สวัสดี",
    "emoji": "I ❤️ 🐍 and 🤖! 👩\u200d👩\u200d👧\u200d👦 👍🏽 🇫🇷 😀😃😄",
    "digits": "0123456789 3.14159 1,000,000 2024-11-25 12:30:45 ١٢٣٤ ⅫⅦ ½",
    "space_run_100": "a" + " " * 100 + "b",
    "space_run_1000": " " * 1000,
    "leading_and_trailing_spaces": "     indented and trailing   ",
    "newline_runs": "line 1\n\n\n\nline 2\r\n\r\nline 3\n",
    "mixed_whitespace": "\t\t x \u00a0 y \u3000 z \u2003 \n \t\n",
    "whitespace_only": " \n \n  \t ",
    "combining_accents": "cafe\u0301 vs caf\u00e9, A\u030a vs \u00c5",
    "ligature_and_fullwidth": "\ufb01le ＡＢＣ１２３",
    "zero_width_characters": "zero\u200bwidth\u200djoiner\ufeffbom",
    "control_characters": "bell\x07 null\x00 del\x7f esc\x1b",
    "long_word": "pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "repeated_characters": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ========== ---------- ##########",
    "all_added_tokens": "".join(ADDED_TOKENS),
    "added_token_lookalikes": "<|im_start |> <|IM_END|> <| endoftext|> <im_end> |> <|",
    "tile_tags": (
        "<Image><tile_1><|vision_pad|><|vision_pad|><tile_2><|vision_pad|><|vision_pad|>"
        "<tile_global_thumbnail><|vision_pad|><|vision_pad|></Image>\nDescribe the image."
    ),
    "tile_tags_bare": "<Image><tile_1><tile_12><tile_global_thumbnail></Image><image>\n",
    "chatml": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    ),
    **{f"inside_text:{token}": f"before{token}after {token} " for token in ADDED_TOKENS},
}
corpus_cases = pytest.mark.parametrize("text", list(CORPUS.values()), ids=list(CORPUS))

# The cases of nvlm_d_72b_chat_prompts.json: prompts as the reference `chat()` builds them, with their ids.
GOLDEN_CASES = (
    "text_only",
    "one_image_7_tiles",
    "one_image_1_tile",
    "two_images_7_and_1_tiles",
    "multi_turn_text",
    "multi_turn_image_second_round",
    "chat_without_sys_prompt_text_only",
    "chat_without_chat_prompt_1_tile",
)

KNOWN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_pad|>": 151654,
}

# tokenizer_config.json fields that must equal the checkpoint's (everything but the chat template).
CONFIG_FIELDS = (
    "tokenizer_class",
    "add_bos_token",
    "add_prefix_space",
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "model_max_length",
    "errors",
    "clean_up_tokenization_spaces",
    "split_special_tokens",
    "added_tokens_decoder",
    "additional_special_tokens",
)


# ----------------------------------------------------------------------------------------------------------- fixtures


def _copy_into(directory: Path, sources: dict[str, Path]) -> Path:
    for name, source in sources.items():
        shutil.copyfile(source, directory / name)
    return directory


@pytest.fixture(scope="module")
def slow_and_fast(repo_root):
    """The repository's tokenizer loaded as the model card does (`use_fast=False`) and with `use_fast=True`."""
    return {
        use_fast: AutoTokenizer.from_pretrained(repo_root, trust_remote_code=True, use_fast=use_fast)
        for use_fast in (False, True)
    }


@pytest.fixture(scope="module")
def tokenizer(slow_and_fast):
    """The repository root's tokenizer (here it overrides conftest's tiny-checkpoint `tokenizer`)."""
    return slow_and_fast[True]


@pytest.fixture(scope="module")
def oracle(reference_dir, tmp_path_factory):
    """The checkpoint's own tokenizer: transformers' Qwen2Tokenizer from its vocab.json, merges.txt and config."""
    directory = _copy_into(
        tmp_path_factory.mktemp("checkpoint_tokenizer"),
        {
            "vocab.json": reference_dir / "nvlm_d_72b_vocab.json",
            "merges.txt": reference_dir / "nvlm_d_72b_merges.txt",
            "tokenizer_config.json": reference_dir / "nvlm_d_72b_tokenizer_config.json",
        },
    )
    return Qwen2Tokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def without_tokenizer_json(repo_root, tmp_path_factory):
    """The repository's tokenizer built from vocab.json + merges.txt alone (no tokenizer.json)."""
    names = ("vocab.json", "merges.txt", "tokenizer_config.json")
    directory = _copy_into(tmp_path_factory.mktemp("vocab_and_merges"), {name: repo_root / name for name in names})
    return Qwen2Tokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def tokenizer_json_backend(repo_root):
    """tokenizer.json as the `tokenizers` library reads it, without transformers."""
    return Tokenizer.from_file(str(repo_root / "tokenizer.json"))


@pytest.fixture(scope="module")
def reference_config(reference_dir):
    return json.loads((reference_dir / "nvlm_d_72b_tokenizer_config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def our_config(repo_root):
    return json.loads((repo_root / "tokenizer_config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def golden_cases(reference_dir):
    return json.loads((reference_dir / "nvlm_d_72b_chat_prompts.json").read_text(encoding="utf-8"))["cases"]


@pytest.fixture(scope="module")
def two_builds(repo_root, tmp_path_factory):
    """tools/build_tokenizer.py run twice, into two fresh directories."""
    for tool in ("dashscope", "tiktoken"):
        if importlib.util.find_spec(tool) is None:
            pytest.skip(f"{tool} is not installed; the tokenizer build needs it (pip install -e .[test])")
    spec = importlib.util.spec_from_file_location("build_tokenizer", repo_root / "tools" / "build_tokenizer.py")
    build_tokenizer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_tokenizer)
    outputs = [tmp_path_factory.mktemp(f"build_{run}") for run in (1, 2)]
    for output in outputs:
        assert build_tokenizer.main(["--output", str(output)]) == 0
    return outputs


# ------------------------------------------------------------------------------------------------ slow and fast loads


def test_use_fast_false_and_true_both_load_a_qwen2_tokenizer(slow_and_fast):
    # transformers 5 drops `use_fast`: the model card's `use_fast=False` loads the tokenizers-backed class too.
    assert all(isinstance(loaded, Qwen2Tokenizer) for loaded in slow_and_fast.values())


@corpus_cases
def test_slow_and_fast_tokenizers_give_identical_ids(slow_and_fast, text):
    assert slow_and_fast[False](text).input_ids == slow_and_fast[True](text).input_ids


# ----------------------------------------------------------------------------------------------------------- ids


def test_hello_world_is_two_tokens_without_bos_or_eos(tokenizer):
    assert tokenizer("Hello world").input_ids == [9707, 1879]


@pytest.mark.parametrize(("token", "token_id"), list(KNOWN_IDS.items()), ids=list(KNOWN_IDS))
def test_known_special_token_ids(tokenizer, token, token_id):
    assert tokenizer.convert_tokens_to_ids(token) == token_id


@pytest.mark.parametrize("token", ADDED_TOKENS)
def test_each_added_token_in_text_encodes_as_its_single_id(tokenizer, token):
    token_id = NUM_BPE_TOKENS + ADDED_TOKENS.index(token)
    assert tokenizer(token).input_ids == [token_id]
    assert tokenizer.convert_ids_to_tokens(token_id) == token


def test_tokenizer_length_is_bpe_vocabulary_plus_22_added_tokens(tokenizer):
    assert len(tokenizer) == NUM_BPE_TOKENS + 22 == 151_665


@corpus_cases
def test_ids_match_the_checkpoint_tokenizer(tokenizer, oracle, text):
    assert tokenizer(text).input_ids == oracle(text).input_ids


def test_golden_prompts_file_has_the_eight_cases(golden_cases):
    assert sorted(golden_cases) == sorted(GOLDEN_CASES)


@pytest.mark.parametrize("case_name", GOLDEN_CASES)
def test_reproduces_golden_prompt_ids(tokenizer, golden_cases, case_name):
    case = golden_cases[case_name]
    assert tokenizer(case["prompt"]).input_ids == case["input_ids"]


@corpus_cases
def test_decoding_returns_the_nfc_normalized_text(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


# ---------------------------------------------------------------------------------------- vocabulary and merges files


def test_vocabulary_equals_the_checkpoint_vocab_entry_for_entry(tokenizer, reference_dir):
    reference_vocab = json.loads((reference_dir / "nvlm_d_72b_vocab.json").read_text(encoding="utf-8"))
    bpe_vocab = {token: index for token, index in tokenizer.get_vocab().items() if index < NUM_BPE_TOKENS}
    assert bpe_vocab == reference_vocab


@pytest.mark.parametrize(
    ("name", "reference_name"),
    [("vocab.json", "nvlm_d_72b_vocab.json"), ("merges.txt", "nvlm_d_72b_merges.txt")],
)
def test_vocab_and_merges_files_are_byte_identical_to_the_checkpoints(repo_root, reference_dir, name, reference_name):
    assert (repo_root / name).read_bytes() == (reference_dir / reference_name).read_bytes()


def test_tokenizer_json_holds_the_vocab_and_merges_of_vocab_json_and_merges_txt(repo_root):
    model = json.loads((repo_root / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert model["vocab"] == json.loads((repo_root / "vocab.json").read_text(encoding="utf-8"))
    assert model["merges"] == (repo_root / "merges.txt").read_text(encoding="utf-8").splitlines()


def test_tokenizer_json_has_the_22_added_tokens_with_their_flags(repo_root, reference_config):
    added = json.loads((repo_root / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    reference = reference_config["added_tokens_decoder"]
    assert {str(entry.pop("id")): entry for entry in added} == reference


@corpus_cases
def test_tokenizer_json_read_by_the_tokenizers_library_gives_the_same_ids(tokenizer, tokenizer_json_backend, text):
    assert tokenizer_json_backend.encode(text).ids == tokenizer(text).input_ids


@corpus_cases
def test_vocab_and_merges_without_tokenizer_json_give_the_same_ids(tokenizer, without_tokenizer_json, text):
    assert without_tokenizer_json(text).input_ids == tokenizer(text).input_ids


# -------------------------------------------------------------------------------------------- tokenizer_config.json


@pytest.mark.parametrize("field", CONFIG_FIELDS)
def test_tokenizer_config_field_equals_the_checkpoints(our_config, reference_config, field):
    assert our_config[field] == reference_config[field]


def test_tokenizer_config_has_the_checkpoints_keys_and_left_padding(our_config, reference_config):
    assert sorted(our_config) == sorted([*reference_config, "padding_side"])
    assert our_config["padding_side"] == "left"


def test_slow_and_fast_tokenizers_pad_a_batch_on_the_left_for_generation(slow_and_fast):
    for tokenizer in slow_and_fast.values():
        batch = tokenizer(["Hi", "Hello there, how are you?"], padding=True)
        assert batch.attention_mask[0][0] == 0 and batch.attention_mask[0][-1] == 1


def test_added_tokens_are_22_from_151643_with_14_special(our_config):
    added = our_config["added_tokens_decoder"]
    assert [added[str(NUM_BPE_TOKENS + offset)]["content"] for offset in range(22)] == list(ADDED_TOKENS)
    assert [entry["special"] for entry in added.values()] == [True] * 14 + [False] * 8
    flags = ("lstrip", "rstrip", "normalized", "single_word")
    assert not any(entry[flag] for entry in added.values() for flag in flags)


def test_additional_special_tokens_are_im_start_to_video_pad(our_config):
    assert our_config["additional_special_tokens"] == list(ADDED_TOKENS[1:14])


def test_chat_template_is_nvlms_not_qwens(our_config, reference_config):
    assert our_config["chat_template"] == CHAT_TEMPLATE
    assert our_config["chat_template"] != reference_config["chat_template"]


def test_loaded_tokenizer_has_the_checkpoints_added_tokens(tokenizer, reference_config):
    loaded = {
        str(index): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for index, token in tokenizer.added_tokens_decoder.items()
    }
    assert loaded == reference_config["added_tokens_decoder"]


def test_loaded_tokenizer_has_eos_im_end_pad_endoftext_and_no_bos_or_unk(tokenizer):
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.bos_token is None
    assert tokenizer.unk_token is None
    assert tokenizer.model_max_length == 131072


# ------------------------------------------------------------------------------------------------------ chat template


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_chat_template_renders_a_question_with_the_default_system_message(tokenizer):
    messages = [{"role": "user", "content": "What is in the picture?"}]
    assert _render(tokenizer, messages) == build_prompt("What is in the picture?")


def test_chat_template_renders_a_custom_system_message(tokenizer):
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a prime."},
    ]
    assert _render(tokenizer, messages) == build_prompt("Name a prime.", system_message="You are a terse assistant.")


def test_chat_template_renders_a_multi_turn_history(tokenizer):
    messages = [
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "I am an AI assistant."},
        {"role": "user", "content": "What can you do?"},
    ]
    expected = build_prompt("What can you do?", history=[("Hello, who are you?", "I am an AI assistant.")])
    assert _render(tokenizer, messages) == expected


def test_chat_template_renders_an_image_part_as_the_image_placeholder_line(tokenizer):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    conversation = get_conv_template("chatml")
    user, assistant = conversation.roles
    conversation.append_message(user, "<image>\nDescribe the image.")
    conversation.append_message(assistant, None)
    assert _render(tokenizer, messages) == conversation.get_prompt()


@pytest.mark.parametrize(
    ("case_name", "messages"),
    [
        ("text_only", [{"role": "user", "content": "Hello, who are you?"}]),
        (
            "multi_turn_text",
            [
                {"role": "user", "content": "Hello, who are you?"},
                {"role": "assistant", "content": "I am an AI assistant."},
                {"role": "user", "content": "What can you do?"},
            ],
        ),
    ],
    ids=["text_only", "multi_turn_text"],
)
def test_chat_template_tokenized_reproduces_the_golden_text_only_prompts(tokenizer, golden_cases, case_name, messages):
    text = _render(tokenizer, messages)
    assert text == golden_cases[case_name]["prompt"]
    assert tokenizer(text).input_ids == golden_cases[case_name]["input_ids"]


# ------------------------------------------------------------------------------------------------------ build script


@pytest.mark.slow
@pytest.mark.parametrize("name", TOKENIZER_FILES)
def test_build_script_output_is_byte_identical_across_runs(two_builds, name):
    first, second = two_builds
    assert (first / name).read_bytes() == (second / name).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", TOKENIZER_FILES)
def test_committed_tokenizer_files_equal_a_fresh_build(two_builds, repo_root, name):
    assert (repo_root / name).read_bytes() == (two_builds[0] / name).read_bytes()


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"])
def test_repository_root_tokenizer_files_are_the_packaged_ones(repo_root, name):
    assert (repo_root / name).resolve() == (repo_root / "nvlm_d" / "tokenizer" / name).resolve()
