"""Image preprocessing for NVLM-D-72B: dynamic tiling into 448x448 tiles and ImageNet normalisation.

This is the one implementation of the model card's `build_transform`, `find_closest_aspect_ratio`,
`dynamic_preprocess` and `load_image`; `load_image`, the CLI and any processor use it.
`load_image` returns tensors bit-identical (`torch.equal`) to the card's `load_image` (with torch's default
dtype float32), and it is faster:

* the two resizes the card does one after the other (the whole image to the tile grid, and to the
  thumbnail) are independent, so they run in two threads (Pillow releases the GIL while resampling);
* the tiles are never cropped out as PIL images: the resized grid is read once as a uint8 array and every
  tile is written straight into its slot of the preallocated [N, 3, s, s] output;
* an RGB input is not copied by `convert("RGB")`;
* the float conversion and normalisation are vectorised numpy operations, tile by tile, split between
  the two threads. They are the card's float32 operations in the card's order (see
  `_normalize_into`), so every value is the same bits. numpy rather than torch because numpy's kernels are
  single-threaded: torch's OpenMP kernels running next to a busy resize thread (or on a shared machine)
  wait on each other.

What remains is the floor: decoding the file and the larger of the two resizes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .image_tiling import (
    ImageInput,
    ImageTooLargeError,
    InvalidImageError,
    _check_has_pixels,
    _closest_grid,
    _describe_pil,
    _open_rgb,
    _positive_int,
    _tile_range,
    _type_name,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    open_image,
    select_grid,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# As torchvision's Normalize builds them: the Python floats rounded to float32, one per channel.
_MEAN_F32 = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD_F32 = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)

# Below this many source pixels the resizes take well under a millisecond and a helper thread costs more
# than it saves.
_MIN_PIXELS_FOR_THREADS = 1 << 18


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_CPU_COUNT = _available_cpus()

# --------------------------------------------------------------------------------------------------------
# Pixels to normalised tensors
# --------------------------------------------------------------------------------------------------------


def _normalize_into(out: np.ndarray, pixels: np.ndarray) -> None:
    """out[...] = ((float32(pixels) / 255) - mean) / std, channel axis -3: torchvision's ToTensor + Normalize.

    ToTensor converts uint8 to float32 (exact) and divides by 255; Normalize subtracts the float32 mean and
    divides by the float32 std. Each step is one correctly rounded IEEE float32 operation, so doing the same
    three operations in the same order gives the same bits, whatever the memory layout or library.
    """
    np.copyto(out, pixels, casting="unsafe")
    np.divide(out, np.float32(255), out=out)
    np.subtract(out, _MEAN_F32, out=out)
    np.divide(out, _STD_F32, out=out)


def _chw(rgb: Image.Image) -> np.ndarray:
    """An RGB image as a read-only uint8 [3, H, W] view (of one [H, W, 3] copy of its pixels)."""
    return np.asarray(rgb).transpose(2, 0, 1)


class ImageTransform:
    """The card's `build_transform(input_size)`: PIL image -> float32 tensor [3, input_size, input_size].

    To RGB (`convert("RGB")` unless already RGB), resize to input_size x input_size with bicubic filtering
    (skipped when already that size), scale to [0, 1] and normalise with the ImageNet mean and std. Equal
    bit for bit to the card's torchvision pipeline (under torch's default dtype float32; the card follows
    `torch.get_default_dtype()`, this always returns float32).
    """

    def __init__(self, input_size: int) -> None:
        self.input_size = _positive_int("input_size", input_size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {_type_name(image)}")
        _check_has_pixels(image, _describe_pil(image))
        size = self.input_size
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        out = np.empty((3, size, size), dtype=np.float32)
        _normalize_into(out, _chw(image))
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(input_size={self.input_size})"


def build_transform(input_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The card's per-tile transform: a callable PIL image -> float32 tensor [3, input_size, input_size].

    See `ImageTransform`. Raises TypeError/ValueError if `input_size` is not a positive int.
    """
    return ImageTransform(input_size)


def _tiles_tensor(
    rgb: Image.Image,
    image_size: int,
    max_num: int,
    *,
    use_threads: bool,
    min_num: int = 1,
    use_thumbnail: bool = True,
) -> torch.Tensor:
    """`load_image` after decoding: tiles (+ thumbnail) of an RGB image as a float32 [N, 3, s, s] tensor."""
    s = image_size
    width, height = rgb.size
    cols, rows = _closest_grid(width, height, min_num, max_num, s)
    n_tiles = cols * rows
    with_thumbnail = use_thumbnail and n_tiles > 1
    out = np.empty((n_tiles + with_thumbnail, 3, s, s), dtype=np.float32)

    def resize_grid() -> np.ndarray:
        # [rows, cols, 3, s, s] view of the resized image: tile (r, c) is its [r, c] entry.
        grid = np.asarray(rgb.resize((s * cols, s * rows)))
        return grid.reshape(rows, s, cols, s, 3).transpose(0, 2, 4, 1, 3)

    def convert_tiles(grid: np.ndarray, first: int, stop: int) -> None:
        for k in range(first, stop):
            _normalize_into(out[k], grid[k // cols, k % cols])

    def make_thumbnail() -> None:
        _normalize_into(out[n_tiles], _chw(rgb.resize((s, s))))

    if not (use_threads and with_thumbnail and width * height >= _MIN_PIXELS_FOR_THREADS):
        convert_tiles(resize_grid(), 0, n_tiles)
        if with_thumbnail:
            make_thumbnail()
        return torch.from_numpy(out)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvlm_d-thumbnail") as helper:
        thumbnail_done = helper.submit(make_thumbnail)
        grid = resize_grid()  # the larger resize, here while the helper does the thumbnail
        half = n_tiles // 2
        first_half_done = helper.submit(convert_tiles, grid, 0, half)
        convert_tiles(grid, half, n_tiles)
        thumbnail_done.result()
        first_half_done.result()
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------------------


def load_image(image: ImageInput, input_size: int = 448, max_num: int = 12) -> torch.Tensor:
    """Load an image as NVLM-D's pixel values: float32 tensor [N, 3, input_size, input_size].

    Bit-identical (`torch.equal`) to the card's `load_image(image_file, input_size, max_num)`: the image is
    decoded and converted to RGB, split by `dynamic_preprocess(min_num=1, max_num, use_thumbnail=True)`
    (N = cols*rows tiles, row-major, plus a last thumbnail tile when cols*rows > 1) and every tile is
    normalised with the ImageNet mean/std. Values lie in about [-2.12, 2.64]; cast with `.to(torch.bfloat16)`
    for the model.

    `image` is one of:
      * a path (str or os.PathLike) to an image file Pillow can read;
      * encoded file contents as `bytes`, `bytearray` or `memoryview` (never a path);
      * a binary file object (anything with `read`; seekable or not);
      * a `PIL.Image.Image` of any mode, used as `image.convert("RGB")` (not copied if already RGB).
    The first frame of multi-frame files is used; EXIF orientation is ignored (as in the card).

    Errors:
      * FileNotFoundError naming the path if it does not exist (other OSErrors from `open` as they are);
      * InvalidImageError (an OSError) naming the input if it is empty, truncated, corrupt or not an image;
      * ImageTooLargeError (a ValueError) if a file has more than 2 x `PIL.Image.MAX_IMAGE_PIXELS` pixels.
        Between 1x and 2x Pillow only warns (`DecompressionBombWarning`) and the image is loaded, as the
        card does; make that warning an error with `warnings.simplefilter("error", Image.DecompressionBombWarning)`
        and it is raised as ImageTooLargeError too. PIL images passed in are not checked (already decoded);
      * TypeError naming the type for any other object (int, None, numpy arrays, text-mode files, ...);
      * ValueError if the image has no pixels, its mode cannot be converted to RGB, or `input_size` /
        `max_num` are < 1 (TypeError if they are not ints).
    """
    input_size = _positive_int("input_size", input_size)
    _, max_num = _tile_range(1, max_num)
    return _tiles_tensor(_open_rgb(image), input_size, max_num, use_threads=_CPU_COUNT > 1)


def load_images(
    images: Iterable[ImageInput],
    input_size: int = 448,
    max_num: int = 12,
    num_workers: int | None = None,
) -> list[torch.Tensor]:
    """`load_image` over many images in parallel; returns their tensors in input order.

    Uses up to `num_workers` threads (default: one per available CPU core), each loading whole images one
    at a time, without `load_image`'s helper thread: the parallelism is across images. `num_workers=1`
    loads them one after another on the calling thread; a single image with `num_workers > 1` is loaded
    exactly as `load_image` does (grid and thumbnail resized in two threads). Threads rather than processes:
    decoding, resizing and the numpy normalisation release the GIL, so threads scale with cores without
    pickling ~10-30 MB of pixels per image back from a worker process, and inputs need not be picklable.

    Raises what `load_image` raises, for the first failing image in input order (with a note naming its
    index), after the argument checks: TypeError/ValueError if `num_workers` is not a positive int.
    """
    input_size = _positive_int("input_size", input_size)
    _, max_num = _tile_range(1, max_num)
    images = list(images)
    num_workers = _positive_int("num_workers", _CPU_COUNT if num_workers is None else num_workers)
    helper_thread = num_workers > 1 and len(images) == 1  # the one spare worker helps within the image

    def load(index: int) -> torch.Tensor:
        try:
            return _tiles_tensor(_open_rgb(images[index]), input_size, max_num, use_threads=helper_thread)
        except Exception as exc:
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(f"while loading images[{index}]")
            raise

    if num_workers == 1 or len(images) <= 1:
        return [load(k) for k in range(len(images))]
    pool = ThreadPoolExecutor(max_workers=min(num_workers, len(images)), thread_name_prefix="nvlm_d-load")
    try:
        return list(pool.map(load, range(len(images))))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------------
# The transformers image processor
# --------------------------------------------------------------------------------------------------------


class NVLM_D_ImagesKwargs(ImagesKwargs, total=False):
    """The tiling settings `NVLM_D_ImageProcessor` (and so `NVLM_D_Processor`) take per call."""

    min_dynamic_patch: int
    max_dynamic_patch: int
    use_thumbnail: bool


class NVLM_D_ImageProcessor(BaseImageProcessor):
    """The model card's `load_image` as a transformers image processor: each image is decoded and converted to RGB
    as the card does (no EXIF rotation), tiled into `min_dynamic_patch..max_dynamic_patch` tiles of
    `image_size` px plus a thumbnail (`use_thumbnail`), and normalised with the ImageNet mean and std.

    Returns `pixel_values` (float32 [total tiles, 3, s, s], the tiles of all images in order, bit-identical to
    `load_image(image, max_num=max_dynamic_patch)` stacked) and `num_patches` (tiles per image). The defaults are
    NVLM-D-72B's config (`max_dynamic_patch` 6, thumbnail on), which vLLM reads as well; the card's `load_image`
    defaults to 12.

    Images may be paths, encoded bytes, binary files or PIL images (URLs are not downloaded); see `load_image`.
    """

    valid_kwargs = NVLM_D_ImagesKwargs
    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 448,
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 6,
        use_thumbnail: bool = True,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.image_size = _positive_int("image_size", image_size)
        self.min_dynamic_patch, self.max_dynamic_patch = _tile_range(min_dynamic_patch, max_dynamic_patch)
        self.use_thumbnail = bool(use_thumbnail)
        if tuple(image_mean) != IMAGENET_MEAN or tuple(image_std) != IMAGENET_STD:
            raise ValueError(
                f"NVLM-D normalises with the ImageNet mean {IMAGENET_MEAN} and std {IMAGENET_STD}, "
                f"got {tuple(image_mean)} and {tuple(image_std)}"
            )
        self.image_mean, self.image_std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        self._valid_kwargs_names = list(NVLM_D_ImagesKwargs.__annotations__)

    def fetch_images(self, images: object) -> object:
        """Decode every image (nested lists kept) as the card does: `Image.open(...).convert("RGB")`, without the
        EXIF rotation that transformers' own loader applies."""
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(image) for image in images]
        return _open_rgb(images)

    def preprocess(
        self,
        images: object,
        min_dynamic_patch: int | None = None,
        max_dynamic_patch: int | None = None,
        use_thumbnail: bool | None = None,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        ignored = sorted(name for name, value in kwargs.items() if value is not None)
        if ignored:
            raise ValueError(
                f"NVLM_D_ImageProcessor does not take {ignored}: tiles are always {self.image_size} px, resized "
                "bicubically and normalised as the model card does (settings: min/max_dynamic_patch, use_thumbnail)"
            )
        min_num, max_num = _tile_range(
            self.min_dynamic_patch if min_dynamic_patch is None else min_dynamic_patch,
            self.max_dynamic_patch if max_dynamic_patch is None else max_dynamic_patch,
        )
        thumbnail = self.use_thumbnail if use_thumbnail is None else bool(use_thumbnail)
        decoded = _flatten(self.fetch_images(images))
        tiles = [
            _tiles_tensor(
                image, self.image_size, max_num, use_threads=_CPU_COUNT > 1, min_num=min_num, use_thumbnail=thumbnail
            )
            for image in decoded
        ]
        data = {"pixel_values": torch.cat(tiles), "num_patches": [len(t) for t in tiles]}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Tiles (thumbnail included) an image of this size gets: what `preprocess` would return for it."""
        images_kwargs = images_kwargs or {}
        min_num = images_kwargs.get("min_dynamic_patch") or self.min_dynamic_patch
        max_num = images_kwargs.get("max_dynamic_patch") or self.max_dynamic_patch
        cols, rows = select_grid(width, height, min_num, max_num, self.image_size)
        thumbnail = images_kwargs.get("use_thumbnail", self.use_thumbnail)
        return cols * rows + (1 if thumbnail and cols * rows > 1 else 0)


def _flatten(images: object) -> list[Image.Image]:
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten(item)]
    return [images]  # type: ignore[list-item]


NVLM_D_ImageProcessor.register_for_auto_class("AutoImageProcessor")


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageTooLargeError",
    "ImageTransform",
    "InvalidImageError",
    "NVLM_D_ImageProcessor",
    "build_transform",
    "dynamic_preprocess",
    "find_closest_aspect_ratio",
    "load_image",
    "load_images",
    "open_image",
    "select_grid",
]
