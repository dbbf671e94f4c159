"""Batches for training: padding, the dummy tile of image-less batches, and packed rows whose examples give the
logits they give alone."""

from __future__ import annotations

import pytest
import torch
from conftest import CONVERSATIONS, write_conversations

from nvlm_d import NVLM_D_Model
from nvlm_d.training import IGNORE_INDEX, ConversationDataset, DataCollator, PackedDataset, pack_lengths


@pytest.fixture(scope="module")
def dataset(conversations_file, tokenizer, tiny_model):
    return ConversationDataset(conversations_file, tokenizer, tiny_model.config)


@pytest.fixture(scope="module")
def collate(tokenizer):
    return DataCollator(tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def training_model(tiny_checkpoint):
    return NVLM_D_Model.from_pretrained(tiny_checkpoint, dtype=torch.float32).train()


def test_a_batch_without_images_gets_one_dummy_tile_flagged_0(dataset, collate):
    batch = collate([dataset[1]])  # text only
    assert batch["pixel_values"].shape == (1, 3, 448, 448) and not batch["pixel_values"].any()
    assert batch["image_flags"].tolist() == [0]


def test_a_batch_with_images_holds_their_tiles_in_order_and_no_dummy(dataset, collate):
    batch = collate([dataset[0], dataset[1], dataset[2]])
    expected = torch.cat([dataset[0]["pixel_values"], dataset[2]["pixel_values"]])
    assert torch.equal(batch["pixel_values"], expected)
    assert batch["image_flags"].tolist() == [1, 1, 1]


def test_rows_are_padded_on_the_right_with_masked_positions_and_no_labels(dataset, collate, tokenizer):
    short, long = dataset[1], dataset[0]
    batch = collate([short, long])
    size = len(short["input_ids"])
    assert batch["input_ids"].shape == (2, len(long["input_ids"]))
    assert batch["attention_mask"][0].tolist() == [1] * size + [0] * (batch["input_ids"].shape[1] - size)
    assert (batch["input_ids"][0, size:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, size:] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][0, :size], short["labels"])


def test_the_dummy_tile_gives_the_loss_of_the_batch_without_images(dataset, collate, training_model):
    batch = collate([dataset[1]])
    with torch.no_grad():
        with_dummy = training_model(**batch).loss
        without = training_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(with_dummy, without, rtol=0, atol=0)


def test_packed_examples_give_the_logits_they_give_alone(tmp_path, tokenizer, collate, training_model):
    path = write_conversations(tmp_path, CONVERSATIONS[:2])  # one image, then text only
    dataset = ConversationDataset(path, tokenizer, training_model.config)
    packed = PackedDataset(dataset, max_length=sum(dataset.lengths))
    assert packed.rows == [[0, 1]]
    row = packed[0]
    examples = [dataset[0], dataset[1]]
    with torch.no_grad():
        packed_logits = training_model(**collate([row])).logits[0]  # train mode: no use_cache passed
        start = 0
        for example in examples:
            alone = training_model(**collate([example])).logits[0]
            torch.testing.assert_close(packed_logits[start : start + len(alone)], alone, rtol=1e-5, atol=1e-5)
            start += len(alone)


def test_a_packed_row_restarts_positions_and_never_labels_an_examples_first_token(dataset):
    packed = PackedDataset(dataset, max_length=sum(dataset.lengths))
    row = packed[0]
    starts = [0]
    for length in dataset.lengths[:-1]:
        starts.append(starts[-1] + length)
    assert [int(p) for p in row["position_ids"][starts]] == [0] * len(starts)
    assert all(row["labels"][start] == IGNORE_INDEX for start in starts)
    assert len(row["pixel_values"]) == sum(len(dataset[k]["pixel_values"]) for k in range(len(dataset)))


def test_packed_batches_carry_position_ids_and_no_attention_mask(dataset, collate):
    packed = PackedDataset(dataset, max_length=max(dataset.lengths))
    batch = collate([packed[0], packed[1]])
    assert "attention_mask" not in batch
    shorter = min(len(packed[0]["input_ids"]), len(packed[1]["input_ids"]))
    row = 0 if len(packed[0]["input_ids"]) == shorter else 1
    assert batch["position_ids"][row, shorter] == 0  # the padding is a sequence of its own


def test_packing_fills_rows_in_order_up_to_max_length():
    assert pack_lengths([3, 4, 2, 5, 1], max_length=7) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than the packing length 8"):
        pack_lengths([3, 9], max_length=8)
