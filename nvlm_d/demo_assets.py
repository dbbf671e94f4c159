"""What `nvlm-d demo` (and `nvlm-d web` without --model) runs on when no model is given: a seeded tiny NVLM-D
checkpoint with random weights, built once and cached, and a generated sample image.

Both live in `cache_root()` ($NVLM_D_CACHE, else ~/.cache/nvlm_d) and are written beside their final place and
renamed into it, so the cache never holds half a file. The tiny checkpoint's name carries the package version, the
seed and a hash of the code it is made of (`nvlm_d.tiny` builds it), so an edited install builds a new one.
An unwritable cache raises CacheError (a ValueError) that says what to set.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .durable_files import fsync_dir

if TYPE_CHECKING:
    from PIL import Image

SAMPLE_IMAGE_SIZE = (1600, 900)


def cache_root() -> Path:
    """Where the demo keeps its tiny checkpoint and sample image: $NVLM_D_CACHE, else ~/.cache/nvlm_d."""
    configured = os.environ.get("NVLM_D_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "nvlm_d"


class CacheError(ValueError):
    """The cache directory cannot be written; the message names it and the fix that applies."""


def _cache_error(root: Path, exc: OSError) -> CacheError:
    """An unusable cache directory, with the fix that applies: NVLM_D_CACHE may be the cause, not the cure."""
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    if os.environ.get("NVLM_D_CACHE"):
        return CacheError(
            f"cannot write to the cache directory {root} ({reason}), which NVLM_D_CACHE names: "
            "point NVLM_D_CACHE at a directory you can write to"
        )
    return CacheError(
        f"cannot write to the cache directory {root} ({reason}): set NVLM_D_CACHE to a directory you can write to"
    )


def _source_fingerprint() -> str:
    """A short hash of the code a tiny checkpoint is made of, so an edited (editable) install rebuilds it."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for name in (
        "configuration_nvlm_d.py",
        "modeling_nvlm_d.py",
        "modeling_intern_vit.py",
        "conversation.py",
        "tiny.py",
        "tokenizer/tokenizer_config.json",
    ):
        file = package / name
        digest.update(name.encode() + b"\0" + (file.read_bytes() if file.is_file() else b"") + b"\0")
    return digest.hexdigest()[:8]


def _fsync_tree(directory: Path) -> None:
    """Every file of `directory` and the directory itself on disk, before it is renamed into the cache."""
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(directory)


def ensure_tiny_checkpoint(seed: int = 0) -> tuple[Path, bool]:
    """The cached tiny checkpoint for this package version, code and seed; built once. Returns (dir, built now).

    Built in a temporary directory beside its final place and renamed into it, so the cache never holds a
    half-written checkpoint (a crash leaves only a `.tmp-*` directory, ignored and removed on the next build);
    two processes building at once both succeed and one copy wins. Raises CacheError when the cache cannot be
    written.
    """
    from .tiny import save_tiny_checkpoint

    root = cache_root()
    final = root / f"tiny-{__version__}-seed{seed}-{_source_fingerprint()}"
    required = ("config.json", "model.safetensors", "tokenizer.json")
    if all((final / name).is_file() for name in required):
        return final, False
    try:
        root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    except OSError as exc:
        raise _cache_error(root, exc) from None
    try:
        if final.exists():  # incomplete (e.g. files removed by hand): rebuild it
            shutil.rmtree(final, ignore_errors=True)
        for stale in root.glob(f".tmp-{final.name}-*"):
            if time.time() - stale.stat().st_mtime > 3600:  # an old crash's leftovers, not a concurrent build
                shutil.rmtree(stale, ignore_errors=True)
        save_tiny_checkpoint(building, seed=seed)
        building.chmod(0o755)
        _fsync_tree(building)
        try:
            os.rename(building, final)
        except OSError:
            if not all((final / name).is_file() for name in required):
                raise
            shutil.rmtree(building, ignore_errors=True)  # another process finished first: use its copy
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return final, True


def draw_sample_image(size: tuple[int, int] = SAMPLE_IMAGE_SIZE) -> Image.Image:
    """A deterministic 16:9 scene (sky and ground gradients, sun, mountains, a house, a tree, a bar chart, text),
    so the demo needs no image file or network. Returns an RGB PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    horizon = int(height * 0.62)

    def lerp(a: tuple[int, ...], b: tuple[int, ...], t: float) -> tuple[int, ...]:
        return tuple(round(x + (y - x) * t) for x, y in zip(a, b, strict=True))

    for y in range(horizon):
        draw.line([(0, y), (width, y)], fill=lerp((38, 84, 170), (250, 205, 160), y / horizon))
    for y in range(horizon, height):
        draw.line([(0, y), (width, y)], fill=lerp((92, 150, 70), (40, 90, 40), (y - horizon) / (height - horizon)))
    sx, sy, sr = int(width * 0.78), int(height * 0.2), int(height * 0.08)
    draw.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=(255, 214, 90), outline=(255, 170, 40), width=6)
    draw.polygon([(0, horizon), (width * 0.18, height * 0.28), (width * 0.4, horizon)], fill=(96, 96, 120))
    draw.polygon([(width * 0.25, horizon), (width * 0.48, height * 0.22), (width * 0.7, horizon)], fill=(80, 80, 104))
    draw.polygon(
        [(width * 0.44, height * 0.3), (width * 0.48, height * 0.22), (width * 0.52, height * 0.3)],
        fill=(240, 240, 250),
    )
    # a house: walls, roof, door, windows
    hx, hy, hw, hh = int(width * 0.08), int(height * 0.55), int(width * 0.16), int(height * 0.2)
    draw.rectangle([hx, hy, hx + hw, hy + hh], fill=(200, 60, 50), outline=(60, 20, 20), width=4)
    draw.polygon([(hx - 20, hy), (hx + hw // 2, hy - hh * 0.7), (hx + hw + 20, hy)], fill=(90, 50, 30))
    draw.rectangle([hx + hw * 0.42, hy + hh * 0.45, hx + hw * 0.58, hy + hh], fill=(70, 40, 20))
    for wx in (hx + hw * 0.12, hx + hw * 0.68):
        draw.rectangle([wx, hy + hh * 0.2, wx + hw * 0.2, hy + hh * 0.45], fill=(180, 220, 255), outline=(40, 40, 40))
    # a tree
    tx, ty = int(width * 0.33), int(height * 0.6)
    draw.rectangle([tx - 12, ty, tx + 12, ty + height * 0.14], fill=(100, 60, 30))
    draw.ellipse([tx - 70, ty - 120, tx + 70, ty + 20], fill=(30, 120, 50))
    # a road
    draw.polygon(
        [(width * 0.55, height), (width * 0.62, horizon), (width * 0.66, horizon), (width * 0.85, height)],
        fill=(70, 70, 70),
    )
    # a bar chart on a card, with labels
    cx, cy, cw, ch = int(width * 0.74), int(height * 0.42), int(width * 0.22), int(height * 0.36)
    draw.rounded_rectangle([cx, cy, cx + cw, cy + ch], radius=16, fill=(250, 250, 245), outline=(30, 30, 30), width=3)
    small = ImageFont.load_default(size=max(12, height // 40))
    big = ImageFont.load_default(size=max(16, height // 12))
    values = (0.35, 0.8, 0.55, 0.95)
    bar_w = cw // (2 * len(values) + 1)
    for k, value in enumerate(values):
        x0 = cx + bar_w * (2 * k + 1)
        y0 = cy + ch - 40 - int((ch - 90) * value)
        draw.rectangle(
            [x0, y0, x0 + bar_w, cy + ch - 40], fill=((60, 110, 200), (220, 120, 40), (60, 160, 90), (170, 60, 160))[k]
        )
        draw.text((x0 + bar_w // 2, cy + ch - 20), "Q" + str(k + 1), fill=(20, 20, 20), font=small, anchor="mm")
    draw.text((cx + cw // 2, cy + 24), "Sales 2024", fill=(20, 20, 20), font=small, anchor="mm")
    draw.text(
        (width * 0.04, height * 0.06),
        "NVLM-D demo",
        fill=(255, 255, 255),
        font=big,
        stroke_width=3,
        stroke_fill=(20, 20, 60),
    )
    draw.text(
        (width * 0.04, height * 0.06 + big.size * 1.3),
        f"a {width}x{height} sample scene",
        fill=(255, 255, 255),
        font=small,
        stroke_width=2,
        stroke_fill=(20, 20, 60),
    )
    return image


def ensure_sample_image() -> Path:
    """The demo's sample scene as a PNG in the cache (written once, atomically). Raises CacheError when the cache
    cannot be written."""
    root = cache_root()
    path = root / f"sample-{SAMPLE_IMAGE_SIZE[0]}x{SAMPLE_IMAGE_SIZE[1]}-v1.png"
    if path.is_file():
        return path
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".tmp-sample-", suffix=".png", dir=root)
    except OSError as exc:
        raise _cache_error(root, exc) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            draw_sample_image().save(handle, format="PNG")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
