"""Image files as a script or a command hands them to `chat`: opened with a one-line error that names the file,
tiled as `load_image` tiles them (keeping the grid it chose, to show it), stacked into `pixel_values` and
`num_patches_list`, and the question given one `<image>` marker per image.

Decoding and the grid choice are `image_tiling`'s, the pixel values `load_image`'s (`image_processing_nvlm_d`): this
module adds names, messages and bookkeeping, no second implementation of either. It imports Pillow, numpy and torch
only inside functions, so that a command parses its arguments (and `nvlm-d tiles` runs) without torch.

Not remote code: nothing under the repository root imports it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from .conversation import IMAGE_PLACEHOLDER
from .messages import one_line


class ImageInputError(ValueError):
    """An image input a person gave cannot be used: a file that is missing or unreadable, or `<image>` markers that do
    not match the images. The message is one line that names the file (or the counts) and says why."""


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """How a model cuts images: the tile side in pixels and the image tokens each tile becomes."""

    size: int
    tokens: int

    @classmethod
    def of(cls, config: Any) -> TileSpec:
        """From an NVLM-D config (`force_image_size`, `num_image_token`)."""
        return cls(int(config.force_image_size), int(config.num_image_token))

    @classmethod
    def default(cls) -> TileSpec:
        """NVLM-D-72B's (its config's defaults): for what tiles images without a model at hand."""
        from .image_tiling import TILE_SIZE, TOKENS_PER_TILE

        return cls(TILE_SIZE, TOKENS_PER_TILE)


@dataclasses.dataclass
class OpenedImage:
    """An image file, decoded and converted to RGB (as `load_image` converts it), with the path it came from."""

    name: str
    image: Any  # PIL.Image.Image, mode RGB


@dataclasses.dataclass
class TiledImage:
    """An image as the model gets it: its tiles' pixel values and how they were cut."""

    name: str
    size: tuple[int, int]  # original width, height
    grid: tuple[int, int]  # cols, rows
    pixel_values: Any  # float32 tensor [num_tiles, 3, tile size, tile size]
    spec: TileSpec

    @property
    def num_tiles(self) -> int:
        return int(self.pixel_values.shape[0])

    def describe(self) -> str:
        """One line for people: the grid, the tile count and the image tokens they cost."""
        cols, rows = self.grid
        tokens = self.num_tiles * self.spec.tokens
        if cols * rows == 1:
            return f"grid 1x1 = 1 tile (a single tile doubles as the thumbnail; {tokens} image tokens)"
        side = self.spec.size
        return (
            f"grid {cols}x{rows} (cols x rows, resized to {cols * side}x{rows * side}) + thumbnail "
            f"= {self.num_tiles} tiles ({tokens} image tokens)"
        )


def open_image_file(path: str | os.PathLike) -> OpenedImage:
    """Decode an image file with `image_tiling.open_image` (as `load_image` decodes it), or raise ImageInputError
    with one line saying why not (`image not found: PATH`, `cannot read image PATH: ...`, `image too large: ...`).

    Decoding needs no model: open images before loading one, so that a bad image fails at once. Open once, then
    `tile_image` without decoding again.
    """
    from .image_tiling import ImageTooLargeError, InvalidImageError, open_image

    name = os.fspath(path)
    try:
        return OpenedImage(name, open_image(name))
    except FileNotFoundError:
        raise ImageInputError(f"image not found: {name}") from None
    except IsADirectoryError:
        raise ImageInputError(f"image is a directory, not a file: {name}") from None
    except ImageTooLargeError as exc:
        raise ImageInputError(f"image too large: {name}: {_about_the_image(exc, name)}") from None
    except InvalidImageError as exc:
        raise ImageInputError(f"cannot read image {name}: {_about_the_image(exc, name)}") from None
    except OSError as exc:  # the file system's error (permission denied, ...), not the data's
        raise ImageInputError(f"cannot read image {name}: {exc.strerror or one_line(exc)}") from None
    except ValueError as exc:  # no pixels, or a mode that does not convert to RGB
        raise ImageInputError(f"cannot read image {name}: {_about_the_image(exc, name)}") from None


def _about_the_image(exc: Exception, name: str) -> str:
    """`image_tiling`'s message without the image's name in front (the message built here names the path itself)."""
    return one_line(exc).removeprefix(f"{name!r}: ")


def tile_image(opened: OpenedImage, max_num: int, spec: TileSpec) -> TiledImage:
    """The pixel values `load_image(path, spec.size, max_num)` gives for this image, and the grid it chose."""
    from .image_processing_nvlm_d import load_image, select_grid

    width, height = opened.image.size
    pixel_values = load_image(opened.image, input_size=spec.size, max_num=max_num)
    grid = select_grid(width, height, max_num=max_num, image_size=spec.size)
    return TiledImage(opened.name, (width, height), grid, pixel_values, spec)


def stack_images(images: Sequence[TiledImage]) -> tuple[Any, list[int] | None]:
    """`pixel_values` and `num_patches_list` for `chat` (None, None without images)."""
    if not images:
        return None, None
    import torch

    return torch.cat([image.pixel_values for image in images]), [image.num_tiles for image in images]


def with_image_placeholders(question: str, num_new_images: int, first_index: int = 1, label: bool = False) -> str:
    """The question with one `<image>` per new image in front, unless it already places its own.

    One image gets `<image>\\n` (as `chat` itself adds); several, or `label=True`, get numbered lines
    `Image-k: <image>\\n` starting at `first_index` (the InternVL/NVLM multi-image convention).
    """
    if num_new_images == 0 or IMAGE_PLACEHOLDER in question:
        return question
    if num_new_images == 1 and not label:
        return f"{IMAGE_PLACEHOLDER}\n{question}"
    lines = "".join(f"Image-{first_index + k}: {IMAGE_PLACEHOLDER}\n" for k in range(num_new_images))
    return lines + question


def check_placeholders(question: str, num_images: int) -> None:
    """Raise ImageInputError unless the question holds exactly one `<image>` marker per image."""
    found = question.count(IMAGE_PLACEHOLDER)
    if found != num_images:
        raise ImageInputError(
            f"the question has {found} {IMAGE_PLACEHOLDER} marker(s) but {num_images} image(s) were given: "
            f"use one marker per image, or none to have them put in front"
        )
