"""The `hf` evaluation backend's batching: requests of like cost share a batch, and the answers come back in request
order whatever order the batches ran in."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from nvlm_d.evaluation.backends import HFBackend, Request, tile_count
from nvlm_d.image_processing_nvlm_d import load_image

# (width, height) -> tiles at 6 tiles + thumbnail: 1x1, 2x1 + thumbnail, 2x2 + thumbnail, 3x2 + thumbnail
# (a square image takes more tiles only when it is large enough: its area counts, not only its shape)
SIZES = {(448, 448): 1, (896, 448): 3, (896, 896): 5, (1344, 896): 7, (40, 40): 1, (40, 20): 3}


class EchoModel:
    """Stands in for NVLM-D: `batch_chat` answers each question with its last line and records the tile counts of
    every batch it was given."""

    dtype = torch.float32

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def batch_chat(self, tokenizer, pixel_values, questions, config, num_patches_list):
        assert pixel_values.shape[0] == sum(num_patches_list)  # the tiles match the counts (a test helper's check)
        self.batches.append(list(num_patches_list))
        return [question.splitlines()[-1] for question in questions]


def _requests(sizes: list[tuple[int, int]]) -> list[Request]:
    return [Request(f"question {index}", [Image.new("RGB", size, "white")], 16) for index, size in enumerate(sizes)]


@pytest.mark.parametrize("size", list(SIZES))
def test_tile_count_is_the_number_of_tiles_load_image_makes(size):
    image = Image.new("RGB", size, "white")
    assert tile_count(image, max_num=6) == load_image(image, max_num=6).shape[0] == SIZES[size]


def test_hf_backend_answers_in_request_order_after_batching_like_requests_together():
    sizes = [(448, 448), (1344, 896), (896, 448), (1344, 896), (448, 448), (896, 896), (896, 448), (896, 896)]
    model = EchoModel()
    answers = HFBackend(model, tokenizer=None, batch_size=2, max_num=6).answer(_requests(sizes))
    assert answers == [f"question {index}" for index in range(len(sizes))]
    assert model.batches == [[7, 7], [5, 5], [3, 3], [1, 1]]


def test_hf_backend_keeps_requests_with_different_token_limits_in_separate_calls():
    requests = _requests([(40, 40), (40, 40), (40, 40)])
    requests[1].max_new_tokens = 64
    model = EchoModel()
    answers = HFBackend(model, tokenizer=None, batch_size=3, max_num=6).answer(requests)
    assert answers == ["question 0", "question 1", "question 2"]
    assert model.batches == [[1], [1, 1]]


def test_tile_count_refuses_an_image_that_is_not_a_pil_image():
    with pytest.raises(TypeError, match="PIL images"):
        tile_count("chart.png")
