"""Uploaded images on the chat page: checked and tiled with the package's one image pipeline, described for the
tiling preview (what `nvlm-d tiles` reports: grid, tile count, image tokens)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from ..image_processing_nvlm_d import ImageTooLargeError, InvalidImageError, load_image, select_grid


class UploadError(ValueError):
    """An upload the page refuses (not an image, corrupt, too large): the message is shown to the user."""


@dataclasses.dataclass(frozen=True)
class TiledUpload:
    """One uploaded image as the model gets it: pixel values [tiles, 3, size, size] and how they were cut."""

    path: str
    width: int
    height: int
    grid: tuple[int, int]  # cols, rows
    pixel_values: Any  # float32 tensor
    tokens_per_tile: int

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def image_tokens(self) -> int:
        return self.num_tiles * self.tokens_per_tile

    def describe(self) -> str:
        """One line: `photo.jpg 1600x900: grid 3x2 + thumbnail = 7 tiles, 1792 image tokens`."""
        cols, rows = self.grid
        grid = (
            "1 tile (no thumbnail)" if cols * rows == 1 else f"grid {cols}x{rows} + thumbnail = {self.num_tiles} tiles"
        )
        return f"{self.name} {self.width}x{self.height}: {grid}, {self.image_tokens} image tokens"


def tile_upload(path: str, max_tiles: int, tile_size: int, tokens_per_tile: int) -> TiledUpload:
    """Decode and tile an uploaded file as `load_image(path, tile_size, max_tiles)` does; UploadError when it is not
    a readable image (a text file, a corrupt file, a decompression bomb)."""
    name = os.path.basename(path)
    try:
        pixel_values = load_image(path, input_size=tile_size, max_num=max_tiles)
    except ImageTooLargeError as exc:
        raise UploadError(f"{name} is too large: {_reason(exc)}") from None
    except InvalidImageError as exc:
        raise UploadError(f"{name} is not an image the model can read: {_reason(exc)}") from None
    except (ValueError, OSError) as exc:
        raise UploadError(f"cannot read {name}: {_reason(exc)}") from None
    from PIL import Image

    with Image.open(path) as image:  # the header only: the size that load_image tiled
        width, height = image.size
    grid = select_grid(width, height, max_num=max_tiles, image_size=tile_size)
    return TiledUpload(path, width, height, grid, pixel_values, tokens_per_tile)


def tile_uploads(paths: Sequence[str], max_tiles: int, tile_size: int, tokens_per_tile: int) -> list[TiledUpload]:
    return [tile_upload(path, max_tiles, tile_size, tokens_per_tile) for path in paths]


def _reason(exc: BaseException) -> str:
    """The library's message without the temporary path it names (the user knows the file by its name)."""
    text = " ".join(str(exc).split())
    head, sep, tail = text.partition(": ")
    return tail if sep and ("/" in head or head.startswith("'")) else text
