"""Batches for `NVLM_D_Model.forward`: padding, packing several examples into one row, and the dummy tile.

A batch is `input_ids`, `labels` (-100 where the loss skips), `pixel_values` (every tile of the batch, in the order
its `<|vision_pad|>` runs appear, row by row) and `image_flags` (1 for a real tile). Then either `attention_mask`
(padded rows) or `position_ids` (packed rows).

Packed rows hold several examples one after another; each example's position ids start again at 0 and there is
no attention mask, which is how transformers recognises packed sequences and keeps each example's attention to
itself (block-diagonal causal masks for SDPA and eager, varlen kernels for flash-attention). The model turns the
KV cache off in training, which that recognition needs (see `NVLM_D_Model.forward`).

A batch without any image gets one dummy tile (zeros) with `image_flags` 0: the vision tower and projector then
run and receive zero gradients, so every rank of a DistributedDataParallel job uses every parameter in every step
(DDP otherwise stops with "parameters that were not used in producing loss"), as in InternVL's training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data import IGNORE_INDEX


class DataCollator:
    """Pads items of `ConversationDataset` (or rows of `PackedDataset`) on the right into one batch.

    Args:
        pad_token_id: the id padding positions get (their labels are -100 and they are masked or isolated).
        image_size: the tile side (448), for the dummy tile.
        pad_to_multiple_of: round the row length up to a multiple of this (tensor-core friendly shapes).
    """

    def __init__(self, pad_token_id: int, image_size: int = 448, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.image_size = image_size
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty list of examples")
        packed = "position_ids" in items[0]
        length = max(len(item["input_ids"]) for item in items)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(items):
            size = len(item["input_ids"])
            input_ids[row, :size] = item["input_ids"]
            labels[row, :size] = item["labels"]
        batch = {"input_ids": input_ids, "labels": labels}
        if packed:
            # The padding at a row's end is a sequence of its own (positions from 0), attending only to itself.
            position_ids = torch.zeros((len(items), length), dtype=torch.long)
            for row, item in enumerate(items):
                size = len(item["position_ids"])
                position_ids[row, :size] = item["position_ids"]
                position_ids[row, size:] = torch.arange(length - size)
            batch["position_ids"] = position_ids
        else:
            lengths = torch.tensor([len(item["input_ids"]) for item in items])
            batch["attention_mask"] = (torch.arange(length)[None, :] < lengths[:, None]).long()
        batch.update(self._tiles(items))
        return batch

    def _tiles(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        tiles = [item["pixel_values"] for item in items if len(item["pixel_values"])]
        if not tiles:
            dummy = torch.zeros(1, 3, self.image_size, self.image_size)
            return {"pixel_values": dummy, "image_flags": torch.zeros(1, dtype=torch.long)}
        pixel_values = torch.cat(tiles)
        return {"pixel_values": pixel_values, "image_flags": torch.ones(len(pixel_values), dtype=torch.long)}


def pack_lengths(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices, in order, into rows of at most `max_length` tokens: each example goes into the
    current row if it fits, else starts a new one.

    Raises:
        ValueError: an example is longer than `max_length` on its own.
    """
    rows: list[list[int]] = []
    used = max_length + 1
    for index, length in enumerate(lengths):
        if length > max_length:
            raise ValueError(f"example {index} has {length} tokens, more than the packing length {max_length}")
        if used + length > max_length:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


class PackedDataset(torch.utils.data.Dataset):
    """Rows of several examples of `dataset` (which must have `lengths`), each row at most `max_length` tokens.

    A row holds its examples' `input_ids`, `labels` and `pixel_values` one after another and `position_ids` that
    start at 0 for each example. An example's first token (`<|im_start|>` of its system turn) is never a label, so
    no example learns to predict the next one.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, max_length: int) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
        self.dataset = dataset
        self.max_length = max_length
        self.rows = pack_lengths(dataset.lengths, max_length)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        lengths = self.dataset.lengths
        return [sum(lengths[index] for index in row) for row in self.rows]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        items = [self.dataset[k] for k in self.rows[index]]
        labels = []
        for item in items:
            item_labels = item["labels"].clone()
            item_labels[0] = IGNORE_INDEX
            labels.append(item_labels)
        return {
            "input_ids": torch.cat([item["input_ids"] for item in items]),
            "labels": torch.cat(labels),
            "position_ids": torch.cat([torch.arange(len(item["input_ids"])) for item in items]),
            "pixel_values": torch.cat([item["pixel_values"] for item in items]),
        }
