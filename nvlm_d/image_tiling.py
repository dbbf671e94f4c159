"""Opening images and choosing their tile grid, as the model card does: Pillow and numpy only.

The half of NVLM-D's preprocessing that needs neither torch nor transformers: decoding any accepted input to an RGB
PIL image with clear errors (`open_image`), the card's grid choice (`select_grid`, `find_closest_aspect_ratio`) and
its tiling (`dynamic_preprocess`). `image_processing_nvlm_d` builds the tensors and the image processor on top of it
and re-exports these names; commands that only look at images (`nvlm-d tiles`) import this module alone and start
in a fraction of the time.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from PIL import Image

# NVLM-D-72B's tiles (its config's `force_image_size` and `num_image_token`: 448 / 14 = 32 patches a side, pixel
# shuffle by 0.5 -> 16 x 16 tokens), for what sizes tiles without a config at hand (`nvlm-d tiles`).
TILE_SIZE = 448
TOKENS_PER_TILE = 256

# What `load_image` accepts (see its docstring).
ImageInput = str | os.PathLike | Image.Image | bytes | bytearray | memoryview | BinaryIO


class InvalidImageError(OSError):
    """The input is readable but is not a decodable image: empty, truncated, corrupt or of an unknown format."""


class ImageTooLargeError(ValueError, Image.DecompressionBombError):
    """The image has more than twice `PIL.Image.MAX_IMAGE_PIXELS` pixels (Pillow's decompression-bomb guard).

    A subclass of both `ValueError` and `PIL.Image.DecompressionBombError`.
    """


# --------------------------------------------------------------------------------------------------------
# Argument checks (public entry points validate; the helpers below them trust their inputs)
# --------------------------------------------------------------------------------------------------------


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {_type_name(value)} ({value!r})")
    value = int(value.__index__())  # type: ignore[attr-defined]
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _tile_range(min_num: object, max_num: object) -> tuple[int, int]:
    min_num = _positive_int("min_num", min_num)
    max_num = _positive_int("max_num", max_num)
    if min_num > max_num:
        raise ValueError(f"min_num ({min_num}) must not exceed max_num ({max_num})")
    return min_num, max_num


def _check_has_pixels(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"{name}: image has no pixels (size {width}x{height})")


def _describe_pil(image: Image.Image) -> str:
    return f"<PIL image, mode {image.mode}>"


def _type_name(value: object) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------------------------------------
# Choosing the tile grid
# --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """The card's `target_ratios`: every (cols, rows) with min_num <= cols*rows <= max_num, in the card's order.

    The card collects the grids in a `set` and stable-sorts it by tile count, so grids with the same tile
    count keep the set's iteration order ((4, 1), (1, 4), (2, 2) for min_num = max_num = 4). That order
    matters on an exact tie between two such grids, which the card can reach when min_num > 1 (a 5:2 image
    with min_num = max_num = 4 is 1.5 from both 4/1 and 2/2). It is reproduced here by inserting the grids into a
    set in the order the card first inserts them: a set's iteration order depends only on the sequence of
    distinct insertions (tuple-of-int hashes are not randomised). The card's generator visits (i, j) first
    at n = max(i, j, min_num), then by i, then by j; this builds the same set in O(#grids), not O(max_num^3).

    With min_num == 1 (as in `load_image`) the order cannot matter: if grids a = i1/j1 < b = i2/j2 with
    i1*j1 == i2*j2 tie, the grid i1/j2 (fewer tiles, so also a candidate) lies strictly between them, closer.
    """
    first_seen = sorted(
        ((i, j) for i in range(1, max_num + 1) for j in range(1, max_num // i + 1) if i * j >= min_num),
        key=lambda grid: (max(grid[0], grid[1], min_num), grid[0], grid[1]),
    )
    return tuple(sorted(set(first_seen), key=lambda grid: grid[0] * grid[1]))


def find_closest_aspect_ratio(
    aspect_ratio: float,
    target_ratios: Sequence[tuple[int, int]],
    width: int,
    height: int,
    image_size: int,
) -> tuple[int, int]:
    """The card's grid choice: the (cols, rows) in `target_ratios` whose cols/rows is closest to `aspect_ratio`.

    `target_ratios` is scanned in order; a candidate replaces the best so far if |aspect_ratio - cols/rows|
    is smaller, or exactly equal and the image area width*height exceeds half the candidate grid's area
    (0.5 * image_size**2 * cols * rows): on a tie, a later (larger) grid wins only for an image big
    enough to fill it. `height` is unused (kept for the card's signature). Returns (1, 1) if
    `target_ratios` is empty.
    """
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for cols, rows in target_ratios:
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def _closest_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    return find_closest_aspect_ratio(width / height, _candidate_grids(min_num, max_num), width, height, image_size)


def select_grid(width: int, height: int, min_num: int = 1, max_num: int = 12, image_size: int = 448) -> tuple[int, int]:
    """The (cols, rows) tile grid `dynamic_preprocess` (and so `load_image`) uses for a width x height image.

    The card's candidates (every grid with min_num <= cols*rows <= max_num, in the card's order) and its
    choice (`find_closest_aspect_ratio`). Raises TypeError/ValueError for non-int or non-positive arguments
    or min_num > max_num.
    """
    width, height = _positive_int("width", width), _positive_int("height", height)
    min_num, max_num = _tile_range(min_num, max_num)
    return _closest_grid(width, height, min_num, max_num, _positive_int("image_size", image_size))


def dynamic_preprocess(
    image: Image.Image,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = False,
) -> list[Image.Image]:
    """Split `image` into a grid of image_size x image_size tiles, exactly as the card's `dynamic_preprocess`.

    The grid (cols, rows), with min_num <= cols*rows <= max_num, is the one whose cols/rows is closest to
    the image's width/height (ties: see `find_closest_aspect_ratio`). The whole image is resized to
    (image_size*cols, image_size*rows) with `Image.resize`'s default filter (bicubic; nearest for modes "1"
    and "P") and cut into tiles in row-major order. With `use_thumbnail` and more than one tile, the whole
    image resized to image_size x image_size is appended last. The image's mode is kept (no conversion).

    Returns a list of cols*rows PIL images (+1 thumbnail).
    Raises TypeError if `image` is not a PIL image or a size is not an int; ValueError if a size is < 1,
    min_num > max_num, or the image has no pixels.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {_type_name(image)}")
    min_num, max_num = _tile_range(min_num, max_num)
    image_size = _positive_int("image_size", image_size)
    _check_has_pixels(image, _describe_pil(image))

    cols, rows = _closest_grid(image.size[0], image.size[1], min_num, max_num, image_size)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for k in range(cols * rows):
        left, top = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


# --------------------------------------------------------------------------------------------------------
# Decoding inputs
# --------------------------------------------------------------------------------------------------------

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _is_bad_data(exc: Exception) -> bool:
    """Whether an exception from Pillow means "bad image data" rather than an I/O failure or lack of memory.

    Pillow's plugins report bad data as OSError without an errno, SyntaxError, ValueError, EOFError,
    struct.error, zlib.error, IndexError, ...; real I/O errors carry an errno.
    """
    if isinstance(exc, MemoryError):
        return False
    return not (isinstance(exc, OSError) and exc.errno is not None)


def _decode(source: str | bytes | BinaryIO, name: str) -> Image.Image:
    """Open and fully decode an encoded image (a path, or a binary file object) with `Image.open`.

    A path goes to `Image.open` itself, as in the card, so that Pillow picks plugins the same way (it tries
    the one for the file's extension first) and closes the file it opened. Pillow's many failure types
    become InvalidImageError / ImageTooLargeError naming `name`; I/O errors (with an errno) pass through.
    """
    try:
        image = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        limit = Image.MAX_IMAGE_PIXELS
        found = _BOMB_PIXELS.search(str(exc))
        size = f"{int(found.group(1))} pixels" if found else "too many pixels"
        if isinstance(exc, Image.DecompressionBombError):
            allowed = f"the limit of {2 * limit} pixels (twice PIL.Image.MAX_IMAGE_PIXELS = {limit})"
        else:  # the warning, raised because the caller turned warnings into errors
            allowed = f"PIL.Image.MAX_IMAGE_PIXELS = {limit}"
        raise ImageTooLargeError(
            f"{name}: image has {size}, more than {allowed}; refusing a possible decompression bomb. "
            "Raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted."
        ) from exc
    except Image.UnidentifiedImageError as exc:
        raise InvalidImageError(f"{name}: {_why_unidentified(source)}") from exc
    except Exception as exc:
        if not _is_bad_data(exc):
            raise
        raise InvalidImageError(f"{name}: cannot read the image header ({type(exc).__name__}: {exc})") from exc
    with image:  # closes the file if Pillow opened it; the decoded pixels stay
        try:
            image.load()
        except Exception as exc:
            if not _is_bad_data(exc):
                raise
            raise InvalidImageError(
                f"{name}: cannot decode the {image.format} image data ({type(exc).__name__}: {exc})"
            ) from exc
    return image


def _why_unidentified(source: str | bytes | BinaryIO) -> str:
    try:
        if isinstance(source, (str, bytes)):
            empty = os.stat(source).st_size == 0
        else:
            empty = source.seek(0, io.SEEK_END) == 0
    except (OSError, ValueError, AttributeError):
        empty = False
    return "the file is empty (0 bytes)" if empty else "not an image in a format Pillow can read"


def _open_rgb(image: object) -> Image.Image:
    """Any accepted input -> a decoded RGB PIL image with at least one pixel (the card's `.convert("RGB")`)."""
    if isinstance(image, Image.Image):
        name = _describe_pil(image)
        try:
            image.load()  # a lazily opened ImageFile decodes here
        except Exception as exc:
            if not _is_bad_data(exc):
                raise
            raise InvalidImageError(f"{name}: cannot decode the image data ({type(exc).__name__}: {exc})") from exc
    elif isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        name = repr(path)
        try:
            image = _decode(path, name)
        except FileNotFoundError as exc:
            if exc.filename != path:
                raise
            url = re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", os.fsdecode(path))
            hint = " (URLs are not downloaded: pass a local path, bytes or a file object)" if url else ""
            raise FileNotFoundError(exc.errno, f"image file not found{hint}", path) from None
    elif isinstance(image, (bytes, bytearray, memoryview)):
        name = f"<{memoryview(image).nbytes} bytes>"
        image = _decode(io.BytesIO(image), name)
    elif callable(getattr(image, "read", None)):
        if isinstance(image, io.TextIOBase):
            raise TypeError(f"image file object {image!r} is in text mode; open it in binary mode ('rb')")
        file_name = getattr(image, "name", None)
        name = repr(file_name) if isinstance(file_name, (str, bytes)) else f"<{type(image).__name__} object>"
        image = _decode(image, name)  # type: ignore[arg-type]
    else:
        hint = ""
        if isinstance(image, np.ndarray) or type(image).__module__.partition(".")[0] == "torch":
            hint = "; convert an array with PIL.Image.fromarray(...) first"
        raise TypeError(
            "image must be a path (str or os.PathLike), a PIL.Image.Image, bytes or a binary file object, "
            f"got {_type_name(image)}{hint}"
        )

    _check_has_pixels(image, name)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"{name}: cannot convert mode {image.mode!r} to RGB ({exc})") from exc


def open_image(image: ImageInput) -> Image.Image:
    """Decode any input `load_image` accepts to an RGB PIL image with at least one pixel (the card's
    `Image.open(...).convert("RGB")`), with `load_image`'s errors: FileNotFoundError, InvalidImageError,
    ImageTooLargeError, TypeError, ValueError (see `load_image`). Open an image once with it and tile it
    (`select_grid`, `dynamic_preprocess`, `load_image`) without decoding it again."""
    return _open_rgb(image)
