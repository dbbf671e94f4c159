"""Training examples from JSONL conversations: the text `chat` would build, labels on the answers only, the images
tiled as `load_image` tiles them, and bad records either stopped with their line or skipped and counted."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from conftest import CONVERSATIONS, write_conversations
from transformers import AutoProcessor

from nvlm_d.conversation import build_prompt
from nvlm_d.image_processing_nvlm_d import load_image
from nvlm_d.training import IGNORE_INDEX, ConversationDataset, RecordError


@pytest.fixture(scope="module")
def config(tiny_model):
    return tiny_model.config


@pytest.fixture(scope="module")
def dataset(conversations_file, tokenizer, config):
    return ConversationDataset(conversations_file, tokenizer, config)


def label_runs(labels: list[int]) -> list[list[int]]:
    """The runs of consecutive labelled positions."""
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def as_chat_messages(record: dict, folder) -> list[dict]:
    """A record as the chat messages `processor.apply_chat_template` takes (image parts carry their paths). One
    image without a placeholder goes in front of the first question, InternVL's (and chat's) rule."""
    names = record.get("image", [])
    names = [names] if isinstance(names, str) else names
    images = iter(str(folder / name) for name in names)
    conversations = [dict(message) for message in record["conversations"]]
    if len(names) == 1 and not any("<image>" in message["value"] for message in conversations):
        first_question = next(message for message in conversations if message["from"] == "human")
        first_question["value"] = "<image>\n" + first_question["value"]
    messages = []
    for message in conversations:
        role = {"human": "user", "gpt": "assistant", "system": "system"}[message["from"]]
        pieces = message["value"].split("<image>\n")
        content = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
        for piece in pieces[1:]:
            content.append({"type": "image", "image": next(images)})
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages


def test_labels_decode_exactly_to_the_answers_and_their_im_end(dataset, tokenizer):
    for example, record in zip(dataset.examples, CONVERSATIONS, strict=True):
        answers = [message["value"] for message in record["conversations"] if message["from"] == "gpt"]
        decoded = [tokenizer.decode(run) for run in label_runs(example.labels)]
        assert decoded == [answer + "<|im_end|>" for answer in answers]


def test_ids_and_labels_equal_the_chat_templates_assistant_mask(dataset, tiny_checkpoint, conversations_file):
    # An independent path to the same text: the processor's jinja chat template with {% generation %} blocks.
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    for example, record in zip(dataset.examples, CONVERSATIONS, strict=True):
        inputs = processor.apply_chat_template(
            as_chat_messages(record, conversations_file.parent),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, mask = inputs["input_ids"][0], inputs["assistant_masks"][0]
        assert example.input_ids == list(ids)
        assert example.labels == [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask, strict=True)]


def test_the_text_up_to_each_answer_is_the_prompt_chat_sends(dataset, tokenizer):
    example = dataset.examples[3]  # the system turn and two rounds about one image
    system = "You name colours."
    first = build_prompt("<image>\nColour?", [1], history=[], system_message=system)
    second = build_prompt("Sure?", [1], history=[("<image>\nColour?", "Blue.")], system_message=system)
    for prompt in (first, second):
        ids = tokenizer(prompt).input_ids
        assert example.input_ids[: len(ids)] == ids
        assert example.labels[len(ids) - 1] == IGNORE_INDEX and example.labels[len(ids)] != IGNORE_INDEX


def test_one_image_without_a_placeholder_goes_in_front_of_the_first_question_as_in_chat(tmp_path, tokenizer, config):
    record = {
        "image": "red.png",
        "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}],
    }
    example = ConversationDataset(write_conversations(tmp_path, [record]), tokenizer, config).examples[0]
    prompt = build_prompt("Colour?", [1])  # chat's own prefixing of "<image>\n"
    assert tokenizer.decode(example.input_ids).startswith(prompt)


def test_items_hold_the_tiles_of_load_image_and_text_only_items_none(dataset, conversations_file):
    red, blue = (load_image(conversations_file.parent / name, max_num=6) for name in ("red.png", "blue.png"))
    assert torch.equal(dataset[0]["pixel_values"], red)
    assert dataset[1]["pixel_values"].shape == (0, 3, 448, 448)
    assert torch.equal(dataset[2]["pixel_values"], torch.cat([red, blue]))
    item = dataset[0]
    assert item["input_ids"].shape == item["labels"].shape and item["input_ids"].dtype == torch.long


def test_a_bad_record_stops_with_an_error_naming_its_line(tmp_path, tokenizer, config):
    records = [CONVERSATIONS[0], {"image": "missing.png", "conversations": CONVERSATIONS[0]["conversations"]}]
    path = write_conversations(tmp_path, records)
    with pytest.raises(RecordError, match=r"train\.jsonl:2: image not found: .*missing\.png"):
        ConversationDataset(path, tokenizer, config)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r":1: not valid JSON"),
        (json.dumps({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}), "turn 1"),
        (json.dumps({"conversations": [{"from": "human", "value": "q"}]}), "ending with a gpt answer"),
        (
            json.dumps({"image": ["red.png", "red.png"], "conversations": CONVERSATIONS[0]["conversations"]}),
            "0 <image>",
        ),
    ],
)
def test_malformed_records_are_explained(tmp_path, tokenizer, config, line, message):
    path = write_conversations(tmp_path, [])
    path.write_text(line + "\n")
    with pytest.raises(RecordError, match=message):
        ConversationDataset(path, tokenizer, config)


def test_bad_records_can_be_skipped_and_are_counted(tmp_path, tokenizer, config, caplog):
    path = write_conversations(tmp_path, CONVERSATIONS[:2])
    path.write_text(path.read_text() + "{broken\n" + json.dumps({"conversations": []}) + "\n")
    with caplog.at_level(logging.WARNING):
        dataset = ConversationDataset(path, tokenizer, config, bad_records="skip")
    assert len(dataset) == 2
    assert dataset.skipped == {"bad record": 2}
    assert "train.jsonl:3" in caplog.text and "train.jsonl:4" in caplog.text


def test_examples_longer_than_max_length_are_left_out_with_a_warning(conversations_file, tokenizer, config, caplog):
    lengths = ConversationDataset(conversations_file, tokenizer, config).lengths
    limit = sorted(lengths)[1]
    with caplog.at_level(logging.WARNING):
        dataset = ConversationDataset(conversations_file, tokenizer, config, max_length=limit)
    assert dataset.lengths == [length for length in lengths if length <= limit]
    assert dataset.skipped == {"longer than max_length": 2}
    assert f"longer than max_length={limit}" in caplog.text and "line 3" in caplog.text


def test_bad_settings_are_refused(conversations_file, tokenizer, config):
    with pytest.raises(ValueError, match="bad_records"):
        ConversationDataset(conversations_file, tokenizer, config, bad_records="ignore")
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        ConversationDataset(conversations_file.parent / "nothing.jsonl", tokenizer, config)


def write_truncated_jpeg(path) -> None:
    """A JPEG cut after half its bytes: its header (and size) read fine, its pixels do not decode."""
    import io

    from PIL import Image

    noise = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    encoded = io.BytesIO()
    Image.fromarray(noise.numpy()).save(encoded, format="JPEG")  # noise: the pixel data is most of the file
    path.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    with Image.open(path) as image:
        assert image.size == (64, 64)  # the header is whole


def truncated_image_records(tmp_path):
    write_truncated_jpeg(tmp_path / "cut.jpg")
    record = {"image": "cut.jpg", "conversations": CONVERSATIONS[0]["conversations"]}
    return write_conversations(tmp_path, [CONVERSATIONS[0], record, CONVERSATIONS[1]])


def test_a_truncated_jpeg_stops_before_training_with_its_line(tmp_path, tokenizer, config):
    path = truncated_image_records(tmp_path)
    with pytest.raises(RecordError, match=r"train\.jsonl:2: cannot read image .*cut\.jpg"):
        ConversationDataset(path, tokenizer, config)


def test_a_truncated_jpeg_is_skipped_and_counted_with_bad_records_skip(tmp_path, tokenizer, config, caplog):
    path = truncated_image_records(tmp_path)
    with caplog.at_level(logging.WARNING):
        dataset = ConversationDataset(path, tokenizer, config, bad_records="skip")
    assert [example.line for example in dataset.examples] == [1, 3]
    assert dataset.skipped == {"bad record": 1}
    assert "train.jsonl:2" in caplog.text
    for index in range(len(dataset)):  # every item that is left loads
        dataset[index]


def test_an_image_broken_after_the_check_is_named_also_through_dataloader_workers(tmp_path, tokenizer, config):
    dataset = ConversationDataset(write_conversations(tmp_path), tokenizer, config)
    write_truncated_jpeg(tmp_path / "blue.png")  # lines 3 and 4 use it
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1)
    with pytest.raises(RecordError) as raised:
        list(loader)
    assert "worker" in str(raised.value)  # torch re-made it around the worker's traceback
    assert re.fullmatch(r".*train\.jsonl:3: cannot load its images: .*", raised.value.record_message())
