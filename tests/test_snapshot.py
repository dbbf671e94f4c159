"""The checkpoint users already have: a downloaded `nvidia/NVLM-D-72B` snapshot (tests/released_snapshot.py lays one
out with tiny weights) works through every API after `import nvlm_d`, unchanged (way 1), and `nvlm-d upgrade` turns
it into a directory that works where `nvlm_d` cannot be imported (way 2).

The oracle is `model.chat` on the snapshot (the card's API): its prompt (`build_prompt`, whose strings are checked
against the reference's golden prompts in test_conversation.py), its pixel values (`load_image(max_num=6)`, checked
bit for bit against the card's code in test_image_processing.py) and its greedy answers.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from released_snapshot import build_released_snapshot, nvlm_d_cli
from test_remote_code import BLOCK_NVLM_D, OUTER_LIMIT_S
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    pipeline,
)

import nvlm_d
from nvlm_d import build_prompt, load_image
from nvlm_d.conversation import expand_image_placeholders
from nvlm_d.remote_code import remote_code_files
from nvlm_d.tiny import TOKENIZER_DIR

MAX_NEW_TOKENS = 6
GREEDY = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}
CASES = ("image", "two_images", "text")


@pytest.fixture(scope="module")
def snapshot(reference_dir, tmp_path_factory) -> Path:
    return build_released_snapshot(tmp_path_factory.mktemp("released") / "NVLM-D-72B", reference_dir, seed=5)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """A 900x500 image (2x1 tiles + thumbnail under the limit of 6) and a 300x300 one (a single tile)."""
    directory = tmp_path_factory.mktemp("images")
    wide = Image.effect_mandelbrot((900, 500), (-2.0, -1.2, 1.0, 1.2), 100).convert("RGB")
    small = Image.radial_gradient("L").resize((300, 300)).convert("RGB")
    wide.save(directory / "wide.png")
    small.save(directory / "small.png")
    return {"wide": directory / "wide.png", "small": directory / "small.png"}


def case(name: str, images: dict[str, Path]) -> dict:
    """A conversation as chat messages, and as `chat` takes it: question, images, expected prompt text."""
    wide, small = str(images["wide"]), str(images["small"])
    if name == "image":
        content = [{"type": "image", "image": wide}, {"type": "text", "text": "Describe."}]
        return {"messages": content, "question": "Describe.", "images": [wide]}
    if name == "two_images":
        content = [
            {"type": "text", "text": "Image-1: "},
            {"type": "image", "image": wide},
            {"type": "text", "text": "Image-2: "},
            {"type": "image", "image": small},
            {"type": "text", "text": "Compare them."},
        ]
        question = "Image-1: <image>\nImage-2: <image>\nCompare them."
        return {"messages": content, "question": question, "images": [wide, small]}
    question = "Hello, who are you?"
    return {"messages": [{"type": "text", "text": question}], "question": question, "images": []}


def messages_of(conversation: dict) -> list[dict]:
    return [{"role": "user", "content": conversation["messages"]}]


def processor_inputs(processor, conversation: dict):
    return processor.apply_chat_template(
        messages_of(conversation), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def tiles_of(conversation: dict) -> list[torch.Tensor]:
    return [load_image(path, max_num=6) for path in conversation["images"]]


@pytest.fixture(scope="module")
def snapshot_model(snapshot):
    return AutoModel.from_pretrained(snapshot, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def snapshot_tokenizer(snapshot):
    return AutoTokenizer.from_pretrained(snapshot, trust_remote_code=True, use_fast=False)


@pytest.fixture(scope="module")
def snapshot_processor(snapshot):
    return AutoProcessor.from_pretrained(snapshot, trust_remote_code=True)


@pytest.fixture(scope="module")
def expected(snapshot_model, snapshot_tokenizer, images) -> dict[str, dict]:
    """Per case, what `chat` does on the snapshot: its prompt ids, pixel values and greedy answer."""
    results = {}
    for name in CASES:
        conversation = case(name, images)
        tiles = tiles_of(conversation)
        num_patches = [len(t) for t in tiles]
        pixel_values = torch.cat(tiles) if tiles else None
        answer = snapshot_model.chat(
            snapshot_tokenizer, pixel_values, conversation["question"], GREEDY, num_patches_list=num_patches or None
        )
        prompt = build_prompt(conversation["question"], num_patches)
        results[name] = {
            "input_ids": snapshot_tokenizer(prompt).input_ids,
            "pixel_values": pixel_values,
            "answer": answer,
        }
    return results


# --------------------------------------------------------------------------------------------------------
# Way 1: the unchanged snapshot after `import nvlm_d`
# --------------------------------------------------------------------------------------------------------


def test_the_snapshot_loads_the_packages_classes_and_never_its_own_code(snapshot, snapshot_model, snapshot_processor):
    assert type(snapshot_model) is nvlm_d.NVLM_D_Model  # the snapshot's own modules raise when imported
    assert type(AutoModelForImageTextToText.from_pretrained(snapshot, trust_remote_code=True)) is nvlm_d.NVLM_D_Model
    assert type(snapshot_processor) is nvlm_d.NVLM_D_Processor
    assert type(snapshot_processor.image_processor) is nvlm_d.NVLM_D_ImageProcessor


def test_the_snapshots_processor_takes_its_tile_limit_from_config_json(snapshot, images, tmp_path):
    variant = tmp_path / "snapshot"
    shutil.copytree(snapshot, variant, copy_function=os.link)
    config = json.loads((variant / "config.json").read_text())
    config["max_dynamic_patch"] = 2
    (variant / "config.json").unlink()  # a hard link to the snapshot's file: replace it, do not write through it
    (variant / "config.json").write_text(json.dumps(config))
    processor = AutoProcessor.from_pretrained(variant, trust_remote_code=True)
    pixel_values = processor(text="<image>\nDescribe.", images=[str(images["wide"])]).pixel_values
    assert processor.image_processor.max_dynamic_patch == 2
    assert torch.equal(torch.as_tensor(pixel_values), load_image(images["wide"], max_num=2))


@pytest.mark.parametrize("name", CASES)
def test_apply_chat_template_on_the_snapshot_gives_chats_prompt_ids_and_pixels(
    name, snapshot_processor, images, expected
):
    inputs = processor_inputs(snapshot_processor, case(name, images))
    assert inputs["input_ids"][0].tolist() == expected[name]["input_ids"]
    if expected[name]["pixel_values"] is None:
        assert "pixel_values" not in inputs
    else:
        assert torch.equal(inputs["pixel_values"], expected[name]["pixel_values"])


def test_the_snapshots_text_prompt_has_nvlms_system_message_not_qwens(snapshot_processor, images):
    text = snapshot_processor.apply_chat_template(messages_of(case("text", images)), add_generation_prompt=True)
    assert text == build_prompt("Hello, who are you?")
    assert text.startswith("<|im_start|>system\nAnswer the questions.<|im_end|>")
    assert (
        snapshot_processor.tokenizer.apply_chat_template(messages_of(case("text", images)), tokenize=False)
        == text[: -len("<|im_start|>assistant\n")]
    )


@pytest.mark.parametrize("name", CASES)
def test_auto_tokenizers_chat_template_on_the_snapshot_gives_chats_prompt_ids(
    name, snapshot_tokenizer, images, expected
):
    """The tokenizer renders each image as its `<image>` placeholder, which `chat` expands by the image's tiles."""
    conversation = case(name, images)
    text = snapshot_tokenizer.apply_chat_template(messages_of(conversation), add_generation_prompt=True, tokenize=False)
    prompt = expand_image_placeholders(text, [len(tiles) for tiles in tiles_of(conversation)])
    assert snapshot_tokenizer(prompt).input_ids == expected[name]["input_ids"]
    if name == "text":
        ids = snapshot_tokenizer.apply_chat_template(messages_of(conversation), add_generation_prompt=True)
        assert ids["input_ids"] == expected[name]["input_ids"]


def test_auto_tokenizer_gives_the_snapshot_nvlms_template_with_one_info_line_and_changes_no_file(snapshot, caplog):
    before = digest(snapshot)
    with caplog.at_level(logging.INFO, logger="nvlm_d.tokenizer_template"):
        tokenizer = AutoTokenizer.from_pretrained(snapshot, trust_remote_code=True)
    assert tokenizer.chat_template == nvlm_d.conversation.CHAT_TEMPLATE
    assert [record.levelname for record in caplog.records if record.name == "nvlm_d.tokenizer_template"] == ["INFO"]
    assert digest(snapshot) == before
    assert "You are Qwen" in json.loads((snapshot / "tokenizer_config.json").read_text())["chat_template"]


def qwen2_directory(directory: Path, reference_dir: Path, model_type: str) -> Path:
    """Tokenizer files with the released tokenizer_config.json (Qwen2.5's template) and a config.json."""
    directory.mkdir()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DIR / name, directory / name)
    shutil.copyfile(reference_dir / "nvlm_d_72b_tokenizer_config.json", directory / "tokenizer_config.json")
    (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return directory


def test_a_qwen2_tokenizer_directory_keeps_its_own_chat_template(reference_dir, tmp_path):
    directory = qwen2_directory(tmp_path / "qwen2", reference_dir, "qwen2")
    released = json.loads((directory / "tokenizer_config.json").read_text())["chat_template"]
    assert AutoTokenizer.from_pretrained(directory).chat_template == released


def test_an_nvlm_d_tokenizer_with_a_template_of_its_own_keeps_it(snapshot_copy):
    config = json.loads((snapshot_copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{- messages[0]['content'] -}}"
    (snapshot_copy / "tokenizer_config.json").unlink()  # a hard link to the snapshot's file: replace it
    (snapshot_copy / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(snapshot_copy, trust_remote_code=True)
    assert tokenizer.chat_template == "{{- messages[0]['content'] -}}"


def test_auto_tokenizer_from_pretrained_keeps_transformers_signature_docstring_and_classmethod():
    method = AutoTokenizer.__dict__["from_pretrained"]
    original = method.__func__.__wrapped__
    assert isinstance(method, classmethod)
    assert inspect.signature(method.__func__) == inspect.signature(original)
    assert AutoTokenizer.from_pretrained.__doc__ == original.__doc__
    assert "Instantiate one of the tokenizer classes" in AutoTokenizer.from_pretrained.__doc__


def test_the_snapshots_processor_expands_image_placeholders_in_plain_text(snapshot_processor, images, expected):
    conversation = case("two_images", images)
    # The reference's prompt format (reference_facts.md F.1), with the `<image>` placeholders still in it.
    prompt = f"<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n{conversation['question']}"
    prompt += "<|im_end|><|im_start|>assistant\n"
    inputs = snapshot_processor(text=prompt, images=conversation["images"], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == expected["two_images"]["input_ids"]
    assert torch.equal(inputs["pixel_values"], expected["two_images"]["pixel_values"])


@pytest.mark.parametrize("name", CASES)
def test_generate_on_the_snapshots_processor_output_answers_as_chat(
    name, snapshot_model, snapshot_processor, images, expected
):
    inputs = processor_inputs(snapshot_processor, case(name, images))
    new_tokens = snapshot_model.generate(**inputs, **GREEDY)
    # `chat` strips the decoded answer, as the reference does
    assert snapshot_processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip() == expected[name]["answer"]


def test_the_pipeline_on_the_snapshot_answers_as_chat(snapshot, images, expected):
    pipe = pipeline("image-text-to-text", model=str(snapshot), trust_remote_code=True, dtype=torch.float32)
    for name in ("image", "text"):
        output = pipe(text=messages_of(case(name, images)), generate_kwargs=GREEDY, return_full_text=False)
        assert output[0]["generated_text"].strip() == expected[name]["answer"], name


# --------------------------------------------------------------------------------------------------------
# Way 2: `nvlm-d upgrade`, then a process without `nvlm_d`
# --------------------------------------------------------------------------------------------------------


def digest(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and modification time: what "unchanged" means."""
    return {
        path.name: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(directory.iterdir())
    }


@pytest.fixture(scope="module")
def upgraded(snapshot, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("upgraded") / "NVLM-D-72B-upgraded"
    before = digest(snapshot)
    code = nvlm_d_cli("upgrade", str(snapshot), str(output))
    return {"code": code, "output": output, "before": before, "after": digest(snapshot)}


ISOLATED_WAY_2 = """
import json, sys
import torch
from transformers import AutoModel, AutoProcessor, AutoTokenizer

directory, cases_file, out = sys.argv[1:4]
cases = json.loads(open(cases_file).read())
model = AutoModel.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True, use_fast=False)
processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
results = {"modules": [type(model).__module__, type(processor).__module__, type(processor.image_processor).__module__]}
greedy = {"max_new_tokens": int(sys.argv[4]), "do_sample": False}
for name, conversation in cases.items():
    inputs = processor.apply_chat_template([{"role": "user", "content": conversation["messages"]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    new_tokens = model.generate(**inputs, **greedy)
    pixel_values = inputs.get("pixel_values")
    num_patches = conversation["num_patches"]
    chat = model.chat(tokenizer, pixel_values, conversation["question"], greedy, num_patches_list=num_patches or None)
    torch.save(pixel_values, f"{out}/{name}.pt")
    results[name] = {"input_ids": inputs["input_ids"][0].tolist(), "chat": chat,
                     "generate": processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()}
open(f"{out}/results.json", "w").write(json.dumps(results))
"""


@pytest.fixture(scope="module")
def without_the_package(upgraded, images, tmp_path_factory) -> dict:
    """The upgraded directory used in a process where `import nvlm_d` fails: per case, the processor's ids and
    pixel values, `generate`'s answer and `chat`'s answer."""
    work = tmp_path_factory.mktemp("way_2")
    cases = {}
    for name in CASES:
        conversation = case(name, images)
        conversation["num_patches"] = [len(t) for t in tiles_of(conversation)]
        cases[name] = conversation
    (work / "cases.json").write_text(json.dumps(cases))
    command = [sys.executable, "-c", BLOCK_NVLM_D + textwrap.dedent(ISOLATED_WAY_2)]
    command += [str(upgraded["output"]), str(work / "cases.json"), str(work), str(MAX_NEW_TOKENS)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=OUTER_LIMIT_S)
    assert finished.returncode == 0, finished.stderr[-4000:]
    results = json.loads((work / "results.json").read_text())
    for name in CASES:
        results[name]["pixel_values"] = torch.load(work / f"{name}.pt")
    return results


def test_upgrade_writes_a_directory_whose_code_is_its_own(without_the_package):
    assert all(module.startswith("transformers_modules.") for module in without_the_package["modules"])


@pytest.mark.parametrize("name", CASES)
def test_the_upgraded_directory_gives_chats_prompt_ids_and_pixels_without_the_package(
    name, without_the_package, expected
):
    assert without_the_package[name]["input_ids"] == expected[name]["input_ids"]
    if expected[name]["pixel_values"] is None:
        assert without_the_package[name]["pixel_values"] is None
    else:
        assert torch.equal(without_the_package[name]["pixel_values"], expected[name]["pixel_values"])


@pytest.mark.parametrize("name", CASES)
def test_the_upgraded_directory_answers_as_chat_on_the_snapshot_without_the_package(
    name, without_the_package, expected
):
    assert without_the_package[name]["generate"] == expected[name]["answer"]
    assert without_the_package[name]["chat"] == expected[name]["answer"]


def test_upgrade_leaves_the_snapshot_unchanged(upgraded):
    assert upgraded["code"] == 0
    assert upgraded["after"] == upgraded["before"]


def test_upgraded_weights_are_the_snapshots_files_linked_not_copied(snapshot, upgraded):
    index = json.loads((snapshot / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    for name in ["model.safetensors.index.json", *shards]:
        assert os.path.samefile(upgraded["output"] / name, snapshot / name), name


def test_upgraded_config_names_the_processor_and_keeps_the_released_architecture(upgraded):
    config = json.loads((upgraded["output"] / "config.json").read_text())
    assert config["architectures"] == ["NVLM_D"]
    assert config["auto_map"]["AutoProcessor"] == "processing_nvlm_d.NVLM_D_Processor"
    assert config["auto_map"]["AutoModel"] == "modeling_nvlm_d.NVLM_D_Model"
    assert "top_p" not in config["llm_config"]


def test_upgraded_generation_defaults_are_the_cards_and_valid(upgraded):
    generation = GenerationConfig.from_pretrained(upgraded["output"])
    generation.validate(strict=True)
    assert (generation.do_sample, generation.max_new_tokens, generation.eos_token_id) == (False, 1024, 151645)
    assert generation.top_p in (None, 1.0)


def test_upgraded_directory_carries_every_remote_code_module_and_a_model_card(upgraded):
    card = (upgraded["output"] / "README.md").read_text()
    for name in remote_code_files():
        assert (upgraded["output"] / name).read_bytes() == (Path(nvlm_d.__file__).parent / name).read_bytes()
        assert f"`{name}`" in card
    assert "trust_remote_code=True" in card and "vllm serve" in card and "license: cc-by-nc-4.0" in card


def test_upgrade_symlinks_the_weights_where_hard_links_are_impossible(snapshot, tmp_path, monkeypatch, capsys):
    def cross_device(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr("nvlm_d.upgrade.os.link", cross_device)
    assert nvlm_d_cli("upgrade", str(snapshot), str(tmp_path / "out")) == 0
    shard = tmp_path / "out" / "model-00001-of-00004.safetensors"
    assert shard.is_symlink() and shard.resolve() == (snapshot / shard.name).resolve()
    assert "symlinked" in capsys.readouterr().out


def test_upgrade_takes_a_hub_id_from_the_hugging_face_cache(snapshot, tmp_path, monkeypatch, capsys):
    """A snapshot as the Hugging Face cache holds it (files linked to blobs), found offline by its Hub id."""
    repo = tmp_path / "hub" / "models--nvidia--NVLM-D-72B"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for path in snapshot.iterdir():
        blob = repo / "blobs" / hashlib.sha256(path.name.encode()).hexdigest()
        os.link(path, blob)
        (repo / "snapshots" / commit / path.name).symlink_to(os.path.relpath(blob, repo / "snapshots" / commit))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert nvlm_d_cli("upgrade", "nvidia/NVLM-D-72B", str(tmp_path / "out")) == 0
    shard = tmp_path / "out" / "model-00001-of-00004.safetensors"
    assert os.path.samefile(shard, snapshot / shard.name)
    assert not shard.is_symlink()


# --------------------------------------------------------------------------------------------------------
# What upgrade refuses: one line, nothing written, nothing changed
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def snapshot_copy(snapshot, tmp_path) -> Path:
    """A copy of the snapshot to damage (hard links: files are replaced, never written through)."""
    copy = tmp_path / "snapshot"
    shutil.copytree(snapshot, copy, copy_function=os.link)
    return copy


def refused(capsys, *args: str) -> str:
    """Run `nvlm-d upgrade ARGS`, check it failed with one line, return that line."""
    assert nvlm_d_cli("upgrade", *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_missing_shard_is_named_and_nothing_is_written(snapshot_copy, tmp_path, capsys):
    (snapshot_copy / "model-00003-of-00004.safetensors").unlink()
    err = refused(capsys, str(snapshot_copy), str(tmp_path / "out"))
    assert "model-00003-of-00004.safetensors: missing" in err
    assert not (tmp_path / "out").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["snapshot"]  # no staging directory left either


def test_a_partially_downloaded_shard_is_named(snapshot_copy, tmp_path, capsys):
    shard = snapshot_copy / "model-00004-of-00004.safetensors"
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data[: len(data) // 2])
    err = refused(capsys, str(snapshot_copy), str(tmp_path / "out"))
    assert "model-00004-of-00004.safetensors" in err and "download is incomplete" in err
    assert not (tmp_path / "out").exists()


def test_another_models_directory_is_refused(tmp_path, capsys):
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    err = refused(capsys, str(tmp_path / "llava"), str(tmp_path / "out"))
    assert "not an NVLM-D model" in err and "'llava'" in err
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_is_refused_without_force_and_left_as_it_was(snapshot, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    err = refused(capsys, str(snapshot), str(output))
    assert "not empty" in err and "--force" in err
    assert [path.name for path in output.iterdir()] == ["notes.txt"]
    assert nvlm_d_cli("upgrade", str(snapshot), str(output), "--force") == 0
    assert (output / "notes.txt").read_text() == "mine"
    assert (output / "config.json").is_file()


def test_writing_into_the_snapshot_is_refused(snapshot, capsys):
    before = digest(snapshot)
    err = refused(capsys, str(snapshot), str(snapshot), "--force")
    assert "the snapshot is never written to" in err
    assert digest(snapshot) == before
