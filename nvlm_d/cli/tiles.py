"""`nvlm-d tiles`: the tile grid an image gets, its token cost, and a picture of the tiles."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..conversation import image_prompt, tile_tags
from ..image_inputs import TileSpec, open_image_file
from .common import CLIError, add_max_num, one_line

PACKAGE_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "tokenizer"

# Layout of the PNG written by `nvlm-d tiles` (public so tests can find the grid lines).
PNG_MARGIN = 24  # left, right and bottom margin
PNG_HEADER = 64  # band above the tiles holding the title; the grid starts at y = PNG_HEADER
PNG_GAP = 48  # between the tile grid and the thumbnail
PNG_BACKGROUND = (255, 255, 255)
GRID_COLOR = (255, 0, 255)  # grid lines: 3 px wide, centred on each tile boundary, drawn last
THUMBNAIL_COLOR = (0, 170, 255)  # outline of the thumbnail


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "tiles",
        help="show how an image is tiled and how many tokens it costs",
        description=(
            "Print the tile grid NVLM-D chooses for IMAGE, the tile count (thumbnail included) and the prompt "
            "tokens it costs, and write a picture of the resized image with the grid drawn over it, beside the "
            "thumbnail. Needs no model: the tile size and tokens per tile are NVLM-D-72B's config defaults."
        ),
    )
    parser.add_argument("image", metavar="IMAGE", help="the image file to tile (any format Pillow reads)")
    add_max_num(parser)
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="where to write the picture; its extension picks the format: .png, .jpg, .webp, ... "
        "(default: <image file name>.tiles.png in the current directory, e.g. photo.jpg.tiles.png)",
    )
    parser.set_defaults(handler=_run_tiles)


# --------------------------------------------------------------------------------------------------------
# nvlm-d tiles
# --------------------------------------------------------------------------------------------------------


def count_image_tokens(num_tiles: int, tokens_per_tile: int) -> int | None:
    """Exact prompt tokens of one image of `num_tiles` tiles (`conversation.image_prompt`), counted with the
    package's tokenizer.json; None when it is not installed. The `tokenizers` library reads the file that
    transformers' fast tokenizer wraps (same ids) without importing transformers and torch, which would be most
    of this command's time."""
    path = PACKAGE_TOKENIZER_DIR / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    return len(tokenizer.encode(image_prompt(num_tiles, tokens_per_tile), add_special_tokens=False).ids)


def picture_path(out: str | None, image: str) -> tuple[Path, str]:
    """Where the picture goes and in which Pillow format, checked before any work is done.

    The default name keeps the image's whole file name (`photo.jpg.tiles.png`), so that `photo.png` and
    `photo.jpg` in one directory get two pictures."""
    from PIL import Image

    path = Path(out) if out else Path(Path(image).name + ".tiles.png")
    extension = path.suffix.lower()
    format_name = Image.registered_extensions().get(extension)
    if format_name is None or format_name not in Image.SAVE:
        shown = extension or "a name without an extension"
        raise CLIError(
            f"--out {path}: cannot tell the picture format from {shown}; end the name with .png, .jpg or .webp "
            "(or another extension Pillow writes)"
        )
    if path.is_dir():
        raise CLIError(f"--out {path}: is a directory")
    directory = path.parent
    if not directory.is_dir():
        raise CLIError(f"--out {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise CLIError(f"--out {path}: directory {directory} is not writable")
    return path, format_name


def render_tiles_png(tiles: Sequence[Any], grid: tuple[int, int], title: str, tile_size: int):
    """The tiles as the model sees them: the grid (resized image) with 3 px `GRID_COLOR` lines on every tile
    boundary and a tag label in each tile, beside the thumbnail (when there is one), under a title line. The
    picture is widened (white on the right) only when the title is wider than the tiles.

    The grid's top-left pixel is at (PNG_MARGIN, PNG_HEADER); the thumbnail's at
    (PNG_MARGIN + cols*tile_size + PNG_GAP, PNG_HEADER).
    """
    from PIL import Image, ImageDraw, ImageFont

    cols, rows = grid
    size = tile_size
    thumbnail = tiles[-1] if len(tiles) > cols * rows else None
    title_font = ImageFont.load_default(size=20)
    label_font = ImageFont.load_default(size=16)
    title_width = int(title_font.getlength(title))
    width = 2 * PNG_MARGIN + max(cols * size + (PNG_GAP + size if thumbnail is not None else 0), title_width)
    height = PNG_HEADER + rows * size + PNG_MARGIN
    canvas = Image.new("RGB", (width, height), PNG_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PNG_MARGIN, PNG_HEADER // 2), title, fill=(0, 0, 0), font=title_font, anchor="lm")

    def label(x: int, y: int, text: str) -> None:
        box = draw.textbbox((x + 8, y + 8), text, font=label_font)
        draw.rectangle([box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3], fill=(0, 0, 0))
        draw.text((x + 8, y + 8), text, fill=(255, 255, 255), font=label_font)

    tags = tile_tags(len(tiles))
    for k in range(cols * rows):
        x, y = PNG_MARGIN + (k % cols) * size, PNG_HEADER + (k // cols) * size
        canvas.paste(tiles[k].convert("RGB"), (x, y))
        label(x, y, f"{k + 1}: {tags[k]}")
    if thumbnail is not None:
        x = PNG_MARGIN + cols * size + PNG_GAP
        canvas.paste(thumbnail.convert("RGB"), (x, PNG_HEADER))
        label(x, PNG_HEADER, f"{len(tiles)}: {tags[-1]} (whole image)")
        draw.rectangle([x - 2, PNG_HEADER - 2, x + size + 1, PNG_HEADER + size + 1], outline=THUMBNAIL_COLOR, width=2)
    for c in range(cols + 1):  # lines last, so nothing covers them
        x = PNG_MARGIN + c * size
        draw.rectangle([x - 1, PNG_HEADER - 1, x + 1, PNG_HEADER + rows * size + 1], fill=GRID_COLOR)
    for r in range(rows + 1):
        y = PNG_HEADER + r * size
        draw.rectangle([PNG_MARGIN - 1, y - 1, PNG_MARGIN + cols * size + 1, y + 1], fill=GRID_COLOR)
    return canvas


def _run_tiles(args: argparse.Namespace) -> int:
    out, picture_format = picture_path(args.out, args.image)
    opened = open_image_file(args.image)
    from ..image_tiling import dynamic_preprocess, select_grid

    spec = TileSpec.default()
    side = spec.size
    width, height = opened.image.size
    cols, rows = select_grid(width, height, max_num=args.max_num, image_size=side)
    tiles = dynamic_preprocess(opened.image, min_num=1, max_num=args.max_num, image_size=side, use_thumbnail=True)
    n = len(tiles)

    print(f"image       {args.image}: {width}x{height} (aspect {width / height:.3f}), --max-num {args.max_num}")
    if n == 1:
        print(f"grid        1x1 (cols x rows), resized to {side}x{side}")
        print("tiles       1 (a single tile is also the thumbnail: no separate thumbnail)")
    else:
        print(f"grid        {cols}x{rows} (cols x rows), resized to {cols * side}x{rows * side}")
        print(f"tiles       {n} = {cols * rows} grid tiles + 1 thumbnail ({side}x{side} each)")
    exact = count_image_tokens(n, spec.tokens)
    pads = n * spec.tokens
    if exact is None:
        print(
            f"tokens      {pads} image tokens ({n} x {spec.tokens}) + the <Image>/<tile_k> tags, not counted: "
            f"the tokenizer files are missing from {PACKAGE_TOKENIZER_DIR}"
        )
        tokens_text = f"{pads}+ tokens"
    else:
        tags = exact - pads
        print(f"tokens      {exact} = {pads} image tokens ({n} x {spec.tokens}) + {tags} tag/wrapper tokens")
        tokens_text = f"{exact} tokens"

    grid_text = f"grid {cols}x{rows}" + (" + thumbnail" if n > 1 else "")
    title = f"{Path(args.image).name}  {width}x{height}  ->  {grid_text} = {n} tiles of {side}x{side}, {tokens_text}"
    picture = render_tiles_png(tiles, (cols, rows), title, side)
    try:
        picture.save(out, format=picture_format)
    except OSError as exc:
        raise CLIError(f"cannot write {out}: {exc.strerror or one_line(exc)}") from None
    print(f"wrote       {out} ({picture.size[0]}x{picture.size[1]})")
    return 0
