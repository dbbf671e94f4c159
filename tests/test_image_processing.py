"""Specification of nvlm_d.image_processing_nvlm_d: the model card's preprocessing, bit for bit, plus clear errors.

The oracle is the model card's "Inference" helper code, as the card has it (model_card_code.py, used here under
a `card_` prefix). Every equality check is `torch.equal` (same shape, dtype and bits).
"""

from __future__ import annotations

import functools
import gc
import io
import warnings
from pathlib import Path

import model_card_code
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from nvlm_d import image_processing_nvlm_d as ip
from nvlm_d import image_tiling
from nvlm_d.image_processing_nvlm_d import (
    ImageTooLargeError,
    InvalidImageError,
    build_transform,
    dynamic_preprocess,
    find_closest_aspect_ratio,
    load_image,
    load_images,
    select_grid,
)

# ------------------------------------------------------------------------------------------------------------
# The oracle: the model card's code (model_card_code.py), and two helpers built from its lines
# ------------------------------------------------------------------------------------------------------------

card_build_transform = model_card_code.build_transform
card_find_closest_aspect_ratio = model_card_code.find_closest_aspect_ratio
card_dynamic_preprocess = model_card_code.dynamic_preprocess
card_load_image = model_card_code.load_image


def card_target_ratios(min_num, max_num):
    """The first two statements of the card's dynamic_preprocess that build `target_ratios`."""
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return target_ratios


def card_load_pil(image, input_size=448, max_num=12):
    """card_load_image for an already opened image: its first line is `.convert('RGB')` of it."""
    image = image.convert("RGB")
    transform = card_build_transform(input_size=input_size)
    images = card_dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    return torch.stack([transform(image) for image in images])


# ------------------------------------------------------------------------------------------------------------
# Test images: seeded noise on gradients, small enough for the whole file to run in seconds
# ------------------------------------------------------------------------------------------------------------


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    gradient = np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 255 // max(width + height - 2, 1)],
        axis=-1,
    )
    noise = rng.integers(-60, 61, size=(height, width, 3))
    return Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8), "RGB")


def image_in_mode(mode: str, width: int = 97, height: int = 61, seed: int = 1) -> Image.Image:
    """A noisy image in `mode`, with values that exercise the mode's range (16-bit, negative, float, alpha)."""
    rng = np.random.default_rng(seed)
    rgb = noise_image(width, height, seed)
    shape = (height, width)
    if mode == "I":
        return Image.fromarray(rng.integers(-1000, 70000, size=shape, dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.uniform(-50.0, 400.0, size=shape).astype(np.float32))
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        values = rng.integers(0, 65536, size=shape, dtype=np.uint16)
        dtype = {"I;16B": ">u2", "I;16L": "<u2"}.get(mode, "=u2")
        return Image.frombytes(mode, (width, height), values.astype(dtype).tobytes())
    alpha = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), "L")
    if mode in ("LA", "PA", "RGBA"):
        base = rgb.convert({"LA": "L", "PA": "P", "RGBA": "RGB"}[mode])
        image = base.convert(mode)
        image.putalpha(alpha)
        return image
    return rgb.convert(mode)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run the oracle's torch ops on one thread: same bits, and no OpenMP stalls when a core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["one thread", "two threads"])
def threading_mode(request, monkeypatch):
    """Run a test with `load_image`'s single-threaded path and with its two-thread path forced on."""
    if request.param == "one thread":
        monkeypatch.setattr(ip, "_CPU_COUNT", 1)
    else:
        monkeypatch.setattr(ip, "_CPU_COUNT", 2)
        monkeypatch.setattr(ip, "_MIN_PIXELS_FOR_THREADS", 0)
    return request.param


# (width, height): tiny, very wide and very tall, square (ties 1x1 with 2x2 and 3x3), near-square, common
# photo shapes, and exact 2:1 and 1:2 ratios (tie 2x1 with 4x2, 1x2 with 2x4) on both sides of the
# tie-break area (0.5 * 448**2 * 8 = 802816 pixels).
SIZES = [
    (1, 1),
    (2, 1),
    (1, 3),
    (7, 5),
    (4000, 50),
    (50, 4000),
    (448, 448),
    (447, 449),
    (640, 480),
    (480, 640),
    (1000, 500),
    (1400, 700),
    (500, 1000),
    (700, 1400),
    (1200, 300),
]


# ------------------------------------------------------------------------------------------------------------
# load_image: bit-identical to the card
# ------------------------------------------------------------------------------------------------------------


@functools.cache
def png_of_size(size: tuple[int, int]) -> bytes:
    return encode(noise_image(*size, seed=size[0] * 7 + size[1]), "PNG", compress_level=1)


@pytest.mark.parametrize("max_num", [1, 6, 12])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_load_image_equals_card_for_many_sizes_and_tile_limits(size, max_num):
    data = png_of_size(size)
    expected = card_load_image(io.BytesIO(data), max_num=max_num)
    assert torch.equal(load_image(data, max_num=max_num), expected)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_two_thread_path_gives_the_same_bits_as_the_one_thread_path(size, monkeypatch):
    image = noise_image(*size, seed=size[0] * 7 + size[1])
    monkeypatch.setattr(ip, "_CPU_COUNT", 1)
    one_thread = load_image(image, max_num=12)
    monkeypatch.setattr(ip, "_CPU_COUNT", 2)
    monkeypatch.setattr(ip, "_MIN_PIXELS_FOR_THREADS", 0)
    assert torch.equal(load_image(image, max_num=12), one_thread)


@pytest.mark.parametrize("input_size", [14, 28, 224, 449])
def test_load_image_equals_card_for_other_tile_sizes(input_size):
    image = noise_image(301, 157, seed=input_size)
    assert torch.equal(load_image(image, input_size=input_size, max_num=6), card_load_pil(image, input_size, 6))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_load_image_equals_card_for_jpeg_and_png_files(tmp_path, fmt, threading_mode):
    path = tmp_path / f"photo.{fmt.lower()}"
    noise_image(900, 600, seed=3).save(path, fmt)
    assert torch.equal(load_image(path, max_num=12), card_load_image(str(path), max_num=12))


PIL_MODES = [
    "1",
    "L",
    "LA",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "I",
    "I;16",
    "I;16L",
    "I;16B",
    "I;16N",
    "F",
]


@pytest.mark.parametrize("mode", PIL_MODES)
def test_pil_image_of_any_mode_is_loaded_as_its_rgb_conversion(mode):
    image = image_in_mode(mode)
    assert image.mode == mode
    assert torch.equal(load_image(image, max_num=6), card_load_pil(image, max_num=6))


# Modes as files store them (TIFF keeps almost every mode; PNG and JPEG a few).
TIFF_MODES = ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "I", "I;16", "I;16B", "F"]
FILE_MODES = [("TIFF", m) for m in TIFF_MODES]
FILE_MODES += [("PNG", m) for m in ["1", "L", "LA", "P", "RGBA", "I;16"]] + [("JPEG", m) for m in ["L", "CMYK"]]


@pytest.mark.parametrize(("fmt", "mode"), FILE_MODES, ids=[f"{f}-{m}" for f, m in FILE_MODES])
def test_file_of_any_mode_is_loaded_as_the_card_loads_it(fmt, mode):
    data = encode(image_in_mode(mode), fmt)
    try:
        expected = card_load_image(io.BytesIO(data), max_num=6)
    except OSError:  # a Pillow that cannot read back what it wrote (12.x: YCbCr TIFF): a clear error, as for any file
        with pytest.raises(InvalidImageError, match="cannot decode"):
            load_image(data, max_num=6)
        return
    assert torch.equal(load_image(data, max_num=6), expected)


def test_unconvertible_mode_raises_value_error_naming_the_mode():
    image = Image.frombytes("La", (20, 10), noise_image(20, 10).convert("LA").tobytes())
    with pytest.raises(ValueError, match="'La'"):
        load_image(image)
    with pytest.raises(ValueError):
        card_load_pil(image)


class NonSeekableStream(io.RawIOBase):
    """A read-only stream that cannot seek, like a pipe or an HTTP response body."""

    def __init__(self, data: bytes) -> None:
        self._buffer = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        chunk = self._buffer.read(len(target))
        target[: len(chunk)] = chunk
        return len(chunk)


INPUT_KINDS = [
    "str path",
    "pathlib path",
    "bytes",
    "bytearray",
    "memoryview",
    "BytesIO",
    "open file",
    "non-seekable stream",
    "PIL image",
    "lazily opened PIL image",
]


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_every_input_kind_gives_the_same_tensor_as_the_card(tmp_path, kind):
    path = tmp_path / "image.png"
    noise_image(500, 260, seed=5).save(path)
    data = path.read_bytes()
    expected = card_load_image(str(path), max_num=6)
    if kind == "str path":
        result = load_image(str(path), max_num=6)
    elif kind == "pathlib path":
        result = load_image(Path(path), max_num=6)
    elif kind == "bytes":
        result = load_image(data, max_num=6)
    elif kind == "bytearray":
        result = load_image(bytearray(data), max_num=6)
    elif kind == "memoryview":
        result = load_image(memoryview(data), max_num=6)
    elif kind == "BytesIO":
        result = load_image(io.BytesIO(data), max_num=6)
    elif kind == "open file":
        with open(path, "rb") as file:
            result = load_image(file, max_num=6)
    elif kind == "non-seekable stream":
        result = load_image(NonSeekableStream(data), max_num=6)
    elif kind == "PIL image":
        result = load_image(Image.open(path).convert("RGB"), max_num=6)
    else:
        with Image.open(path) as lazy:
            result = load_image(lazy, max_num=6)
    assert torch.equal(result, expected)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_file_uses_its_first_frame(tmp_path, fmt):
    path = tmp_path / f"frames.{fmt.lower()}"
    frames = [noise_image(120, 80, seed=k).convert("P") for k in range(3)]
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:])
    assert torch.equal(load_image(path, max_num=6), card_load_image(str(path), max_num=6))


def test_file_opened_from_a_path_is_closed_after_loading(tmp_path):
    path = tmp_path / "frames.tiff"
    frames = [noise_image(60, 40, seed=k) for k in range(2)]
    frames[0].save(path, save_all=True, append_images=frames[1:])  # multi-frame: Pillow keeps such files open
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)  # an unclosed file warns when garbage-collected
        load_image(path)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_result_is_a_contiguous_float32_tensor_of_tiles():
    result = load_image(noise_image(900, 450), input_size=56, max_num=12)
    assert result.dtype == torch.float32
    assert result.is_contiguous()
    assert result.shape[1:] == (3, 56, 56)


def test_single_tile_image_gets_no_thumbnail():
    assert load_image(noise_image(300, 300), max_num=12).shape[0] == 1
    assert load_image(noise_image(900, 450), max_num=1).shape[0] == 1


def test_multi_tile_image_ends_with_a_thumbnail_of_the_whole_image():
    image = noise_image(200, 100)  # 2:1 and below half the area of 4x2 tiles of 112: a 2x1 grid
    result = load_image(image, input_size=112, max_num=12)
    assert result.shape[0] == 2 + 1
    assert torch.equal(result[-1], build_transform(112)(image.resize((112, 112))))


def test_tiles_are_cut_in_row_major_order():
    image = noise_image(300, 200)  # 3:2 -> a 3x2 grid
    s = 32
    result = load_image(image, input_size=s, max_num=6)
    resized = image.resize((3 * s, 2 * s))
    for k in range(6):
        row, col = divmod(k, 3)
        tile = resized.crop((col * s, row * s, (col + 1) * s, (row + 1) * s))
        assert torch.equal(result[k], build_transform(s)(tile))


def test_rgb_pil_input_is_left_unchanged():
    image = noise_image(300, 200)
    before = image.tobytes()
    load_image(image, max_num=6)
    assert image.mode == "RGB" and image.tobytes() == before


def test_rgb_default_resize_filter_is_bicubic():
    """The card resizes with `Image.resize`'s default filter; for RGB images that is bicubic."""
    image = noise_image(123, 77)
    assert image.resize((64, 48)).tobytes() == image.resize((64, 48), Image.Resampling.BICUBIC).tobytes()


# ------------------------------------------------------------------------------------------------------------
# build_transform
# ------------------------------------------------------------------------------------------------------------


def test_transform_normalises_every_byte_value_of_every_channel_like_torchvision():
    """All 256 values in each channel, in positions that hit both vectorised and scalar loop tails."""
    values = np.arange(256, dtype=np.uint8)
    pixels = np.stack([np.roll(values, 85 * c) for c in range(3)], axis=-1)  # [256, 3]
    image = Image.fromarray(np.resize(pixels, (37, 37, 3)))  # 37 is odd: rows do not align with SIMD widths
    assert torch.equal(build_transform(37)(image), card_build_transform(37)(image))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
@pytest.mark.parametrize("size", [(448, 448), (500, 300), (20, 31)])
def test_transform_equals_the_cards_for_any_mode_and_size(mode, size):
    image = image_in_mode(mode, *size)
    result = build_transform(448)(image)
    assert result.shape == (3, 448, 448) and result.dtype == torch.float32
    assert torch.equal(result, card_build_transform(448)(image))


def test_transform_rejects_non_images_and_bad_sizes():
    with pytest.raises(TypeError, match="ndarray"):
        build_transform(448)(np.zeros((448, 448, 3), np.uint8))
    with pytest.raises(ValueError, match="input_size"):
        build_transform(0)
    with pytest.raises(TypeError, match="input_size"):
        build_transform(448.0)


# ------------------------------------------------------------------------------------------------------------
# Grid choice and dynamic_preprocess
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_num", range(1, 25))
def test_candidate_grids_follow_the_cards_set_order(max_num):
    for min_num in range(1, max_num + 1):
        assert list(image_tiling._candidate_grids(min_num, max_num)) == card_target_ratios(min_num, max_num)


def test_grid_choice_equals_the_cards_for_all_tile_ranges_up_to_12():
    sizes = [(w * k, h * k) for w in range(1, 14) for h in range(1, 14) for k in (1, 4, 7)]
    for max_num in range(1, 13):
        for min_num in range(1, max_num + 1):
            ratios = card_target_ratios(min_num, max_num)
            for width, height in sizes:
                expected = card_find_closest_aspect_ratio(width / height, ratios, width, height, 28)
                assert select_grid(width, height, min_num, max_num, 28) == expected, (width, height, min_num)


def test_find_closest_aspect_ratio_equals_the_cards_on_any_candidate_list():
    rng = np.random.default_rng(7)
    for _ in range(300):
        ratios = [tuple(int(v) for v in rng.integers(1, 6, size=2)) for _ in range(int(rng.integers(0, 12)))]
        width, height = (int(v) for v in rng.integers(1, 200, size=2))
        got = find_closest_aspect_ratio(width / height, ratios, width, height, 28)
        assert got == card_find_closest_aspect_ratio(width / height, ratios, width, height, 28)


def test_select_grid_is_the_grid_dynamic_preprocess_cuts():
    for size, max_num in [((640, 480), 12), ((4000, 50), 6), ((1, 1), 12), ((1400, 700), 12), ((1000, 500), 12)]:
        cols, rows = select_grid(*size, max_num=max_num)
        tiles = dynamic_preprocess(noise_image(*size), max_num=max_num, image_size=448)
        assert len(tiles) == cols * rows
    with pytest.raises(ValueError, match="width"):
        select_grid(0, 10)
    with pytest.raises(ValueError, match="min_num"):
        select_grid(10, 10, min_num=7, max_num=6)


@pytest.mark.parametrize(
    ("size", "grid"),
    [((78, 39), (2, 1)), ((80, 40), (4, 2))],
    ids=["area below half of 4x2 tiles", "area above half of 4x2 tiles"],
)
def test_exact_ratio_tie_prefers_the_larger_grid_only_for_images_above_half_its_area(size, grid):
    # 2:1 ties 2x1 with 4x2 exactly; 4x2 of 28-pixel tiles is 8 * 784 pixels, half of it 3136.
    tiles = dynamic_preprocess(noise_image(*size), max_num=12, image_size=28)
    assert len(tiles) == grid[0] * grid[1]
    assert [t.tobytes() for t in tiles] == [t.tobytes() for t in card_dynamic_preprocess(noise_image(*size), 1, 12, 28)]


@pytest.mark.parametrize(
    ("size", "grid"),
    [((60, 24), (4, 1)), ((65, 26), (2, 2))],
    ids=["below the tie-break area", "above the tie-break area"],
)
def test_tie_between_grids_of_equal_tile_count_follows_the_cards_set_order(size, grid):
    # With min_num = max_num = 4 the candidates are (4, 1), (1, 4), (2, 2) in the card's set order; a 5:2
    # image is 1.5 from both 4/1 and 2/2, so (2, 2), which comes later, wins only above 0.5 * 28**2 * 4.
    # Sorting the candidates by (tiles, cols) instead would give the opposite answers.
    image = noise_image(*size)
    tiles = dynamic_preprocess(image, min_num=4, max_num=4, image_size=28)
    expected = card_dynamic_preprocess(image, min_num=4, max_num=4, image_size=28)
    assert [t.tobytes() for t in tiles] == [t.tobytes() for t in expected]
    assert ip._closest_grid(*size, 4, 4, 28) == grid


@pytest.mark.parametrize("mode", ["RGB", "1", "L", "P", "LA", "RGBA", "I;16", "F"])
@pytest.mark.parametrize("use_thumbnail", [False, True])
def test_dynamic_preprocess_equals_the_cards_and_keeps_the_mode(mode, use_thumbnail):
    image = image_in_mode(mode, 150, 50)
    tiles = dynamic_preprocess(image, 2, 6, 32, use_thumbnail)
    expected = card_dynamic_preprocess(image, 2, 6, 32, use_thumbnail)
    assert [(t.mode, t.size, t.tobytes()) for t in tiles] == [(t.mode, t.size, t.tobytes()) for t in expected]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_num": 0}, ValueError),
        ({"min_num": 0}, ValueError),
        ({"min_num": 5, "max_num": 4}, ValueError),
        ({"image_size": 0}, ValueError),
        ({"max_num": 6.0}, TypeError),
        ({"min_num": True}, TypeError),
    ],
)
def test_dynamic_preprocess_rejects_bad_tile_ranges(kwargs, error):
    with pytest.raises(error):
        dynamic_preprocess(noise_image(10, 10), **kwargs)


def test_dynamic_preprocess_rejects_non_images_and_empty_images():
    with pytest.raises(TypeError, match="PIL"):
        dynamic_preprocess(b"not an image")
    with pytest.raises(ValueError, match="no pixels"):
        dynamic_preprocess(Image.new("RGB", (0, 5)))


# ------------------------------------------------------------------------------------------------------------
# Errors at the boundary
# ------------------------------------------------------------------------------------------------------------


def test_missing_file_raises_file_not_found_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_image.jpg"
    with pytest.raises(FileNotFoundError, match="no_such_image.jpg"):
        load_image(missing)
    with pytest.raises(FileNotFoundError, match="no_such_image.jpg"):
        load_image(str(missing))


def test_url_is_not_downloaded_and_the_error_says_so():
    with pytest.raises(FileNotFoundError, match="URLs are not downloaded"):
        load_image("https://example.com/image.png")


def test_directory_raises_an_os_error_naming_it(tmp_path):
    with pytest.raises(OSError, match=str(tmp_path.name)):
        load_image(tmp_path)


def test_empty_file_raises_invalid_image_error_saying_it_is_empty(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InvalidImageError, match=r"empty\.png.*empty \(0 bytes\)"):
        load_image(path)
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(b"")


def test_file_that_is_not_an_image_raises_invalid_image_error_naming_it(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("just some text, not pixels")
    with pytest.raises(InvalidImageError, match="notes.txt.*not an image"):
        load_image(path)
    assert issubclass(InvalidImageError, OSError)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF"])
def test_truncated_file_raises_invalid_image_error_naming_it(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    data = encode(noise_image(90, 60), fmt)
    path.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(InvalidImageError, match=rf"cut\.{fmt.lower()}.*truncated"):
        load_image(path)


def test_corrupt_png_data_raises_invalid_image_error():
    data = bytearray(encode(noise_image(90, 60), "PNG"))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    with pytest.raises(InvalidImageError, match="PNG"):
        load_image(bytes(data))


def test_loading_never_turns_on_pillows_truncated_image_tolerance():
    load_image(noise_image(20, 20))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_image_over_twice_the_pixel_limit_raises_image_too_large_naming_size_and_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(noise_image(50, 50), "PNG")  # 2500 pixels > 2 * 1000
    with pytest.raises(ImageTooLargeError, match=r"2500 pixels.*2000 pixels.*1000") as info:
        load_image(data)
    assert isinstance(info.value, ValueError) and isinstance(info.value, Image.DecompressionBombError)


def test_image_between_one_and_two_times_the_limit_loads_with_pillows_warning(monkeypatch):
    # 200,000 pixels against a limit of 150,000: Pillow warns and the card goes on. One 448x448 tile (200,704 pixels)
    # stays under twice the limit too, which Pillow 12 also checks on the images that resizing makes.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150_000)
    data = encode(noise_image(500, 400), "PNG")
    with pytest.warns(Image.DecompressionBombWarning):
        result = load_image(data, max_num=1)
    with pytest.warns(Image.DecompressionBombWarning):
        expected = card_load_image(io.BytesIO(data), max_num=1)
    assert torch.equal(result, expected)


def test_pixel_limit_warning_made_an_error_raises_image_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(noise_image(40, 40), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError, match="1600 pixels"):
            load_image(data)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (3, "int"),
        (None, "NoneType"),
        (1.5, "float"),
        ([1, 2], "list"),
        (np.zeros((4, 4, 3), np.uint8), "ndarray"),
        (torch.zeros(3, 4, 4), "Tensor"),
    ],
    ids=["int", "None", "float", "list", "numpy array", "torch tensor"],
)
def test_object_that_is_not_an_image_raises_type_error_naming_its_type(value, type_name):
    with pytest.raises(TypeError, match=type_name):
        load_image(value)


def test_text_mode_file_raises_type_error(tmp_path):
    with pytest.raises(TypeError, match="binary mode"):
        load_image(io.StringIO("abc"))


def test_image_with_no_pixels_raises_value_error():
    with pytest.raises(ValueError, match="no pixels"):
        load_image(Image.new("RGB", (0, 7)))


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"max_num": 0}, ValueError, "max_num"),
        ({"max_num": -3}, ValueError, "max_num"),
        ({"max_num": 6.0}, TypeError, "max_num"),
        ({"max_num": "6"}, TypeError, "max_num"),
        ({"max_num": True}, TypeError, "max_num"),
        ({"input_size": 0}, ValueError, "input_size"),
        ({"input_size": -448}, ValueError, "input_size"),
        ({"input_size": 448.0}, TypeError, "input_size"),
        ({"input_size": None}, TypeError, "input_size"),
    ],
)
def test_bad_sizes_raise_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        load_image(noise_image(10, 10), **kwargs)


def test_numpy_integers_are_accepted_as_sizes():
    image = noise_image(90, 60)
    assert torch.equal(load_image(image, np.int64(56), np.int32(6)), load_image(image, 56, 6))


# ------------------------------------------------------------------------------------------------------------
# load_images: the parallel loader
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory):
    """Paths (JPEG), encoded PNG bytes and L-mode PIL images of several shapes."""
    directory = tmp_path_factory.mktemp("many")
    inputs = []
    for k, size in enumerate([(320, 240), (100, 450), (500, 250), (33, 17), (240, 320), (600, 150)]):
        image = noise_image(*size, seed=100 + k)
        if k % 3 == 0:
            path = directory / f"image{k}.jpg"
            image.save(path)
            inputs.append(path)
        elif k % 3 == 1:
            inputs.append(encode(image, "PNG"))
        else:
            inputs.append(image.convert("L"))
    return inputs


@pytest.fixture(scope="module")
def loaded_one_by_one(mixed_inputs):
    return [load_image(image, max_num=6) for image in mixed_inputs]


@pytest.mark.parametrize("num_workers", [None, 1, 2, 3])
def test_parallel_loader_equals_loading_one_by_one_in_order(mixed_inputs, loaded_one_by_one, num_workers):
    result = load_images(mixed_inputs, max_num=6, num_workers=num_workers)
    assert len(result) == len(loaded_one_by_one)
    assert all(torch.equal(a, b) for a, b in zip(result, loaded_one_by_one, strict=True))


def test_parallel_loader_accepts_any_iterable_one_image_and_none(mixed_inputs, loaded_one_by_one):
    assert load_images(iter([])) == []
    result = load_images(iter(mixed_inputs[:2]), max_num=6)
    assert torch.equal(result[1], loaded_one_by_one[1])
    (single,) = load_images([mixed_inputs[0]], max_num=6, num_workers=2)
    assert torch.equal(single, loaded_one_by_one[0])


def test_parallel_loader_raises_the_first_failure_with_its_index(mixed_inputs):
    images = list(mixed_inputs[:2]) + [b"broken"] + list(mixed_inputs[2:])
    with pytest.raises(InvalidImageError) as info:
        load_images(images, max_num=6, num_workers=2)
    assert "images[2]" in "".join(getattr(info.value, "__notes__", ["images[2]"]))


@pytest.mark.parametrize(("num_workers", "error"), [(0, ValueError), (1.0, TypeError)])
def test_parallel_loader_rejects_bad_worker_counts(num_workers, error):
    with pytest.raises(error, match="num_workers"):
        load_images([noise_image(10, 10)], num_workers=num_workers)


def test_sizes_table_covers_both_sides_of_the_448_tie_break():
    """Guards SIZES: 1000x500 stays 2x1 while 1400x700 goes to 4x2 (tie-break area 802816 pixels)."""
    threshold = 0.5 * 448 * 448 * 8
    assert 1000 * 500 < threshold < 1400 * 700
    assert ip._closest_grid(1000, 500, 1, 12, 448) == (2, 1)
    assert ip._closest_grid(1400, 700, 1, 12, 448) == (4, 2)
    assert threshold == 802816


def test_the_tile_constants_are_the_configs_defaults():
    from nvlm_d.configuration_nvlm_d import NVLM_D_Config

    config = NVLM_D_Config()
    assert (image_tiling.TILE_SIZE, image_tiling.TOKENS_PER_TILE) == (config.force_image_size, config.num_image_token)
