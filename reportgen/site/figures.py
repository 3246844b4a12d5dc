"""Figures: map sprites, token maps, object boxes, perturbation curves, the index's figures.

The pages compose every overlay in the browser: each map is a tile of one small PNG per image
(:func:`write_map_sprite`, colours by a numpy colour-map lookup) laid over the one model-input
JPEG with its opacity, so no blended photo is encoded per map. :func:`overlay` blends the same
map into the image for the notebook panels and the export. matplotlib/seaborn are used only where
axes and labels carry meaning. Photographs are JPEG (PNG compression of a photo costs 15-70 ms,
JPEG under 1 ms); maps (patch grids, token maps) are PNG. The object similarities are HTML tables
coloured by the page (:mod:`reportgen.site.heat`), not figures. Every writer takes plain
arrays, with fixed encoder settings and no timestamps, so identical inputs give identical bytes.
"""

from __future__ import annotations

import math
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reportgen import colourmaps, outdir
from reportgen.methods import METHODS, figure_key, method_maps, patch_layers
from reportgen.site.scales import ScaleSetting, result_scales, tile_tops, to_unit

# Figures are built with matplotlib's object API (Figure, not pyplot), so no backend is switched
# and no global figure state is touched in the user's process.

THUMB_SIDE = 320
#: matplotlib's figures (through Pillow); the per-image maps are encoded by :func:`png_bytes`.
PNG_OPTIONS = {"optimize": False, "compress_level": 1}
JPEG_OPTIONS = {"quality": 90, "optimize": False, "progressive": False, "subsampling": "4:2:0"}
# Distinct, colour-blind-safe box colours (Okabe-Ito).
BOX_COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#FFFFFF"]


# Every writer takes a destination: a path, or a binary file opened for writing (a build passes
# files from reportgen.outdir, which checks that they lie inside its staging folder).
Destination = Path | BinaryIO


def _make_parent(path: Destination) -> None:
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def png_bytes(pixels: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """An 8-bit PNG of ``pixels`` (uint8): ``[h, w, 3]`` RGB, or ``[h, w]`` indices into
    ``palette`` (``[n, 3]`` uint8, n <= 256).

    Written here rather than by Pillow, whose PNG encoder tries every row filter on RGB rows and
    feeds zlib a row at a time. Colour-mapped pixels gain nothing from row filters (neighbouring
    values are not close in colour), so every row gets filter 0. zlib at level 1: RGB with the
    default strategy (its matches find the repeated 3-byte colours); palette indices with
    run-length matches only, which compress the maps' runs of equal indices as well and faster.
    No timestamps or text chunks: the same pixels give the same bytes.
    """
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or 0 in pixels.shape:
        raise ValueError(f"png_bytes takes a non-empty uint8 [h, w] or [h, w, 3] array, got {pixels.dtype} {pixels.shape}")
    if (pixels.ndim == 3) != (palette is None) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError("png_bytes takes RGB pixels without a palette, or indices with one")
    if palette is not None and not (palette.shape[1:] == (3,) and 1 <= len(palette) <= 256 and int(pixels.max()) < len(palette)):
        raise ValueError(f"png_bytes: a palette of 1 to 256 RGB colours covering every index, got {palette.shape}")
    height, width = pixels.shape[:2]
    rows = np.zeros((height, 1 + pixels[0].size), dtype=np.uint8)  # each row: its filter type (0), then its bytes
    rows[:, 1:] = pixels.reshape(height, -1)
    strategy = zlib.Z_DEFAULT_STRATEGY if pixels.ndim == 3 else zlib.Z_RLE
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 8, strategy)
    data = compressor.compress(rows) + compressor.flush()
    colour_type = 2 if palette is None else 3  # RGB, palette
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    chunks = [_png_chunk(b"IHDR", header)]
    if palette is not None:
        chunks.append(_png_chunk(b"PLTE", np.ascontiguousarray(palette, dtype=np.uint8).tobytes()))
    chunks += [_png_chunk(b"IDAT", data), _png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def save_png(pixels: np.ndarray, path: Destination, palette: np.ndarray | None = None) -> None:
    """:func:`png_bytes` written to ``path``."""
    data = png_bytes(pixels, palette)
    if isinstance(path, Path):
        _make_parent(path)
        path.write_bytes(data)
    else:
        path.write(data)


def save_jpeg(image: Image.Image, path: Destination) -> None:
    _make_parent(path)
    image.save(path, format="JPEG", **JPEG_OPTIONS)


@lru_cache(maxsize=8)
def colour_lut(cmap: str) -> np.ndarray:
    """``[256, 3]`` uint8 RGB lookup table of a matplotlib colour map (read-only, shared): from
    :mod:`reportgen.colourmaps` when it carries the map, else from matplotlib."""
    table = colourmaps.table(cmap)
    if table is not None:
        lut = np.frombuffer(table, dtype=np.uint8).reshape(256, 3).copy()
    else:
        import matplotlib  # only for a map reportgen does not carry: an image's figures need it for nothing else

        lut = (matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    lut.flags.writeable = False
    return lut


def colourise(unit: np.ndarray, cmap: str) -> np.ndarray:
    """``[..., 3]`` uint8 RGB colours of values in [0, 1] under a colour map."""
    return colour_lut(cmap)[np.clip((unit * 255).round(), 0, 255).astype(np.uint8)]


def heat_to_unit(heat: np.ndarray, top: float | None = None) -> np.ndarray:
    """Scale a non-negative map to [0, 1] by ``top`` (default: its maximum); values above ``top``
    become 1, and an all-zero map (or a ``top`` of 0) stays 0. See :mod:`reportgen.site.scales`."""
    if top is None:
        top = float(np.max(heat)) if heat.size else 0.0
    return to_unit(heat, top)


# Padding is drawn in greys: the map's value stays visible as brightness, but no colour of the
# scale, so a hot spot there is not read as a hot spot on the image.
_PADDING_GREY = 0.55  # share of a light grey mixed into the desaturated map


def grey_out(rgb: np.ndarray, padding: np.ndarray) -> np.ndarray:
    """``rgb`` (``[..., 3]`` uint8 or float) with the pixels where ``padding`` is True desaturated
    and lightened; the rest unchanged (same dtype)."""
    out = rgb.astype(np.float32, copy=True)
    luminance = out[padding] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out[padding] = ((1.0 - _PADDING_GREY) * luminance + _PADDING_GREY * 200.0)[:, None]
    return out.round().astype(rgb.dtype) if rgb.dtype == np.uint8 else out


def padding_pixels(size: tuple[int, int], content_box: tuple[float, float, float, float]) -> np.ndarray:
    """``[h, w]`` True for the pixels (by their centres) outside ``content_box`` (input pixels)."""
    w, h = size
    x0, y0, x1, y1 = content_box
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    inside_x, inside_y = (xs >= x0) & (xs <= x1), (ys >= y0) & (ys <= y1)
    return ~(inside_y[:, None] & inside_x[None, :])


def upsampled_unit(heat: np.ndarray, top: float | None, size: tuple[int, int]) -> np.ndarray:
    """``[h, w]`` float32 values in [0, 1] of a patch-grid map drawn from 0 to ``top``
    (:func:`heat_to_unit`), upsampled bilinearly to ``size`` (width, height): smooth maps, the
    patch grid itself stays in the explorers."""
    unit = Image.fromarray(heat_to_unit(heat, top).astype(np.float32), mode="F")
    return np.asarray(unit.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def overlay(
    view: Image.Image,
    heat: np.ndarray,
    cmap: str,
    alpha: float,
    content_box: tuple[float, float, float, float] | None = None,
    top: float | None = None,
) -> Image.Image:
    """Blend a patch-grid map over the model's view of the image.

    Args:
        view: the RGB image the model saw (model-input size).
        heat: ``[rows, cols]`` non-negative map, drawn from 0 to ``top`` (default: its maximum).
        cmap: matplotlib colour-map name.
        alpha: opacity of the colour layer, in (0, 1].
        content_box: the part of ``view`` that is image (input pixels); outside it (letterbox
            padding) the blend is drawn in greys. None: all of it is image.
    """
    colours = colourise(upsampled_unit(heat, top, view.size), cmap)
    base = np.asarray(view, dtype=np.float32)
    blended = (1.0 - alpha) * base + alpha * colours.astype(np.float32)
    if content_box is not None:
        padding = padding_pixels(view.size, content_box)
        if padding.any():
            blended = grey_out(blended, padding)
    return Image.fromarray(blended.round().astype(np.uint8), "RGB")


#: Sprite pixels of a map tile: about this many along the grid's longer side (an odd whole number
#: per patch: then a sample lies on each patch's centre, where the bilinear map has its kinks).
#: Enough samples that the browser's smooth scaling between them looks like the bilinear overlay
#: of :func:`overlay` (3 per patch on a 16 x 16 grid: 0.7 levels apart on average, where 4 give
#: 0.8 and 2 give 2.0), few enough that the sprite costs a millisecond or two to encode.
MAP_TILE_SIDE = 48
#: Pixels repeated around each tile (its edge copied outwards): the browser's smooth scaling
#: samples a pixel or two beyond the part it shows, which must be the tile's own edge, not the
#: next tile's.
MAP_TILE_GUTTER = 2


def map_tile_scale(grid: tuple[int, int]) -> int:
    """Sprite pixels per patch of a map tile over a patch ``grid`` (rows, cols): the odd number
    nearest to :data:`MAP_TILE_SIDE` over the longer side, and at least 3: with one pixel per
    patch the browser would blend the colours of neighbouring patches, not colour the
    interpolated values (a 37 x 37 grid at 518 px gets 111-pixel tiles)."""
    return max(3, 2 * math.floor(MAP_TILE_SIDE / max(grid) / 2) + 1)


def map_sprite(
    heats: list[np.ndarray],
    tops: list[float],
    cmap: str,
    view_size: tuple[int, int],
    content_box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Every overlay map of one image as tiles in one row, ``[H, W, 3]`` uint8, for the page to lay
    over the model input (the browser applies the overlay's opacity).

    Each map is upsampled bilinearly from the patch grid to :func:`map_tile_scale` pixels per
    patch and coloured from 0 to its top (as :func:`overlay` does at full size); pixels whose
    centres lie outside ``content_box`` (letterbox padding, in input pixels of ``view_size``) are
    drawn in greys. Tile ``i`` holds its map in the ``cols * k`` x ``rows * k`` pixels at
    ``(i * (cols * k + 2g) + g, g)``, with ``g`` = :data:`MAP_TILE_GUTTER` pixels of its own edge
    around them.
    """
    rows, cols = heats[0].shape
    k = map_tile_scale((rows, cols))
    size = (cols * k, rows * k)
    colours = colourise(np.stack([upsampled_unit(heat, top, size) for heat, top in zip(heats, tops)]), cmap)  # [n, rows*k, cols*k, 3]
    if content_box is not None:
        fx, fy = size[0] / view_size[0], size[1] / view_size[1]
        x0, y0, x1, y1 = content_box
        padding = padding_pixels(size, (x0 * fx, y0 * fy, x1 * fx, y1 * fy))
        if padding.any():  # only those pixels: the whole stack in floats costs as much as the rest
            colours[:, padding] = grey_out(colours[:, padding], np.ones(colours.shape[:1] + (int(padding.sum()),), dtype=bool))
    g = MAP_TILE_GUTTER
    tiles = np.pad(colours, ((0, 0), (g, g), (g, g), (0, 0)), mode="edge")
    return np.ascontiguousarray(np.concatenate(list(tiles), axis=1))


def write_map_sprite(
    heats: list[np.ndarray],
    tops: list[float],
    cmap: str,
    view_size: tuple[int, int],
    path: Destination,
    content_box: tuple[float, float, float, float] | None = None,
) -> None:
    """:func:`map_sprite` as a PNG. RGB, not RGBA: every pixel is opaque (the run's opacity is the
    page's, so one sprite serves any ``alpha``), and an alpha channel would be a constant."""
    save_png(map_sprite(heats, tops, cmap, view_size, content_box), path)


def write_explorer_sprite(
    layers: np.ndarray, cmap: str, path: Destination, padding: np.ndarray | None = None, tops: np.ndarray | None = None
) -> None:
    """Every patch-grid map of the layer explorer in one PNG, one pixel per patch.

    Row ``l`` holds layer ``l``'s tiles, one per explorer column (the methods' columns in order:
    for ``attention`` each head then the mean over heads, for ``rollout`` the rollout through
    layers ``0..l``); each tile is drawn from 0 to its top (default: its own maximum). The page shows one tile at a time,
    scaled up by the browser. One file instead of ``L * K`` tiny ones: writing (and, on rebuilds,
    linking) the files cost more than drawing the maps.

    Args:
        layers: ``[L, K, rows, cols]`` the maps of the K columns at every layer.
        padding: ``[rows, cols]`` True for patches that are all letterbox padding: drawn in greys.
        tops: ``[L, K]`` the value drawn at the top colour in each tile
            (:func:`~reportgen.site.scales.tile_tops`); None: each tile's maximum.
    """
    count, columns, rows, cols = layers.shape
    if tops is None:
        tops = layers.max(axis=(2, 3))
    index = indexed_colours(to_unit(layers, np.asarray(tops)[:, :, None, None]), cmap, overwrite=True)  # [L, K, rows, cols]: colourise's levels
    sheet = index.transpose(0, 2, 1, 3).reshape(count * rows, columns * cols)
    if padding is not None and padding.any():
        # The greys do not fit in the palette beside the map's 256 colours: RGB, the same colours.
        save_png(grey_out(colour_lut(cmap)[sheet], np.tile(padding, (count, columns))), path)
    else:
        save_png(sheet, path, palette=colour_lut(cmap))


def write_patch_sprite(attention: np.ndarray, grid: tuple[int, int], cmap: str, path: Destination, padding: np.ndarray | None = None) -> None:
    """Where each patch attends, at each kept layer, in one PNG: one tile per (layer, query patch),
    one pixel per key patch.

    The tile of query patch ``(r, c)`` at kept layer ``l`` is at tile column ``c`` and tile row
    ``l * rows + r`` (so each layer is a ``rows`` x ``cols`` block of tiles laid out as the patch
    grid). Each tile is coloured from 0 to its own maximum: rows of one layer differ by orders of
    magnitude, and a shared scale would leave most of them black.

    Args:
        attention: ``[L', P, P]`` patch-to-patch attention (rows: queries, columns: keys; mean
            over heads), ``P = rows * cols``.
        grid: the patch grid (rows, cols).
        padding: ``[rows, cols]`` True for patches that are all letterbox padding: drawn in greys.
    """
    rows, cols = grid
    count = attention.shape[0]
    keys_padded = np.broadcast_to(padding.reshape(1, -1), attention.shape[1:]) if padding is not None and padding.any() else None
    index = np.empty(attention.shape, dtype=np.uint8)  # [L', queries, keys]
    # Each tile divided by its maximum in float64 (to_unit divides in the input's precision; the
    # levels agree to within rounding), a layer at a time into one buffer: no temporary copy of
    # the whole sheet.
    unit = np.empty(attention.shape[1:], dtype=np.float64)
    for layer, out in zip(np.asarray(attention), index):
        top = layer.max(axis=-1, keepdims=True)
        # A tile with a top of 0 holds no positive value: divided by infinity it is 0, as to_unit makes it.
        np.divide(layer, np.where(top > 0, top, np.inf), out=unit, dtype=np.float64)
        out[...] = indexed_colours(unit, cmap, keys_padded, overwrite=True)  # clipped to the levels, as to [0, 1]
    index = index.reshape(count, rows, cols, rows, cols)  # [L', qr, qc, kr, kc]
    sheet = index.transpose(0, 1, 3, 2, 4).reshape(count * rows * rows, cols * cols)
    save_png(sheet, path, palette=indexed_palette(cmap, keys_padded is not None))


def _levels(padded: bool) -> int:
    # A sheet with padding gives half its palette to the greys of the padding.
    return 128 if padded else 256


def indexed_colours(unit: np.ndarray, cmap: str, padding: np.ndarray | None = None, overwrite: bool = False) -> np.ndarray:
    """Palette indices (uint8) of values in [0, 1] for :func:`indexed_palette`: the colour map in
    256 levels, or, with ``padding`` (True where a pixel is letterbox padding), in 128 levels with
    the padding's pixels in the greys of :func:`grey_out` at indices 128-255. An indexed PNG holds
    a third of the RGB bytes, so it encodes in about a third of the time. ``overwrite``: a float
    ``unit`` is scaled in place (no temporary copy of a large sheet)."""
    levels = _levels(padding is not None)
    scaled = np.multiply(unit, levels - 1, out=unit if overwrite and unit.dtype.kind == "f" else None)  # in unit's precision
    np.clip(np.rint(scaled, out=scaled), 0, levels - 1, out=scaled)
    index = scaled.astype(np.uint8)
    if padding is not None:
        index[padding] += levels
    return index


@lru_cache(maxsize=8)
def indexed_palette(cmap: str, padded: bool) -> np.ndarray:
    """``[n, 3]`` uint8 palette of :func:`indexed_colours`' indices (``padded``: as made with
    padding; read-only, shared)."""
    levels = _levels(padded)
    lut = colour_lut(cmap)[np.round(np.linspace(0, 255, levels)).astype(int)]
    palette = np.concatenate([lut, grey_out(lut, np.ones(levels, dtype=bool))]) if padded else lut
    palette.flags.writeable = False
    return palette


def shrink(image: Image.Image, side: int) -> Image.Image:
    """The image if it fits in ``side`` x ``side`` pixels, else a smaller copy that does (callers
    only read it)."""
    if max(image.size) <= side:
        return image
    small = image.copy()
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    return small


def write_colourbar(cmap: str, path: Destination, width: int = 256, height: int = 12) -> None:
    row = colour_lut(cmap)[np.linspace(0, 255, width).round().astype(int)]
    save_png(np.repeat(row[None], height, axis=0), path)


def save_figure(fig, path: Destination) -> None:
    """A matplotlib figure as PNG at 100 dpi, with no metadata that changes between runs."""
    _make_parent(path)
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None}, pil_kwargs=PNG_OPTIONS)


def write_token_map(
    attention: np.ndarray, num_prefix_tokens: int, cmap: str, path: Destination, top: float | None = None
) -> None:
    """Token-to-token attention ``[N, N]`` (rows: queries, columns: keys), one pixel per token.

    Drawn with numpy/Pillow (a full matplotlib figure costs ~15x more) and scaled up by the browser
    (pixelated); drawn from 0 to ``top`` (default: its maximum), with a white line between the
    prefix tokens and the patches. The page's caption and colour bar explain the axes.
    """
    pixels = indexed_colours(heat_to_unit(attention, top), cmap, overwrite=True)  # colourise's 256 levels
    palette: np.ndarray | None = colour_lut(cmap)
    if num_prefix_tokens:
        unused = np.flatnonzero(np.bincount(pixels.ravel(), minlength=256) == 0)
        if unused.size:  # the line's white takes the palette entry of a level no token is drawn at
            line = int(unused[0])
            palette = palette.copy()
            palette[line] = 255
        else:  # every level is drawn: no entry is free for the line
            pixels, line, palette = palette[pixels], 255, None
        # An inserted line, not an overwritten one: every token keeps its row and column.
        pixels = np.insert(pixels, num_prefix_tokens, line, axis=0)
        pixels = np.insert(pixels, num_prefix_tokens, line, axis=1)
    save_png(pixels, path, palette)


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont:
    # Loaded once per size: drawing does not change a font.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


#: A label's place: ``(x0, y0, x1, y1)`` in whole pixels, ``x1`` and ``y1`` exclusive.
Rect = tuple[int, int, int, int]


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(boxes: list[Rect], sizes: list[tuple[float, float]], canvas: tuple[int, int]) -> list[Rect | None]:
    """Where each box's label goes, so that no two labels overlap and each lies in the canvas.

    Each label is tried by its box's top-left corner (just above the box, then just inside it),
    then by its bottom-left corner (just below, then just inside), then at the same places on the
    right, then along the box's left edge, nearest its top first. A label that fits nowhere gets None (it goes in a band below
    the image: :func:`draw_boxes`).

    Args:
        boxes: ``(x0, y0, x1, y1)`` of each box, in canvas pixels.
        sizes: ``(width, height)`` of each label, in whole pixels.
        canvas: the image's (width, height).
    """
    width, height = canvas
    placed: list[Rect] = []
    out: list[Rect | None] = []
    for (x0, y0, x1, y1), (w, h) in zip(boxes, sizes):
        x0, y0, x1, y1 = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)  # whole pixels
        lefts = (min(max(x0, 0), width - w), min(max(x1 - w, 0), width - w))
        tops = (y0 - h, y0, y1, y1 - h)  # above, inside at the top, below, inside at the bottom
        candidates = [(left, top) for left in lefts for top in tops]
        # Then rows along the box's left edge (a quarter of a label apart), nearest its top first.
        rows = sorted(range(0, max(height - h, 0) + 1, max(1, h // 4)), key=lambda y: (abs(y - y0), y))
        candidates += [(lefts[0], y) for y in rows]
        spot = None
        for left, top in candidates:
            rect = (left, top, left + w, top + h)
            if left >= 0 and top >= 0 and rect[2] <= width and rect[3] <= height and not any(_overlaps(rect, r) for r in placed):
                spot = rect
                break
        if spot is not None:
            placed.append(spot)
        out.append(spot)
    return out


def draw_boxes(image: Image.Image, boxes: list[tuple[str, tuple[float, float, float, float], float | None]]) -> tuple[Image.Image, list[Rect]]:
    """The image with labelled boxes (label and, for detections, the score), and where each label
    was drawn. Labels never overlap one another: each goes at a free place by its box
    (:func:`place_labels`), or, if there is none, in a band added below the image, in the box's colour."""
    width = max(2, round(max(image.size) / 250))
    font = _font(max(12, round(max(image.size) / 40)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [label if score is None else f"{label} {score:.2f}" for label, _box, score in boxes]
    extents = [measure.textbbox((0, 0), text, font=font) for text in texts]
    sizes = [(right - left + 2 * width, bottom - top + 2 * width) for left, top, right, bottom in extents]
    spots = place_labels([box for _l, box, _s in boxes], sizes, image.size)
    # Labels with no place by their box: rows of a band under the image, left to right.
    band: list[Rect] = []
    x = y = row = 0
    for spot, (w, h) in zip(spots, sizes):
        if spot is None:
            if x > 0 and x + w > image.width:
                x, y, row = 0, y + row + width, 0
            band.append((x, image.height + width + y, x + w, image.height + width + y + h))
            x, row = x + w + width, max(row, h)
    extra = y + row + 2 * width if band else 0
    canvas = Image.new("RGB", (image.width, image.height + extra), (60, 60, 60))  # dark: a white label shows
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (_label, box, _score) in enumerate(boxes):
        draw.rectangle(box, outline=BOX_COLOURS[i % len(BOX_COLOURS)], width=width)
    rects, spare = [], iter(band)
    for i, (text, spot, (left, top, _r, _b)) in enumerate(zip(texts, spots, extents)):
        rect = spot if spot is not None else next(spare)
        draw.rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=BOX_COLOURS[i % len(BOX_COLOURS)])  # PIL's corners are inclusive
        draw.text((rect[0] + width - left, rect[1] + width - top), text, fill="black", font=font)
        rects.append(rect)
    return canvas, rects


def write_boxes(image: Image.Image, boxes: list[tuple[str, tuple[float, float, float, float], float | None]], path: Destination) -> None:
    """The original image with labelled boxes (see :func:`draw_boxes`)."""
    save_jpeg(draw_boxes(image, boxes)[0], path)


#: Raised when a figure drawn from the records changes its look (the index's figure is named by a
#: hash of its data and this, so a rebuild links the old one only if it would look the same).
FIGURE_VERSION = 1

#: What each method's line in the entropy-per-layer figure shows.
LAYER_LINES = {"attention": "attention (mean over heads)", "rollout": "rollout through the layer"}


def layer_entropy_figure(records: list[dict]):
    """Normalised entropy per layer across the images (seaborn): one line per method, the mean
    over the images that have a value at that layer, with their range shaded (no random
    resampling, so the same records draw the same figure). None when no image has any."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    rows = [
        (LAYER_LINES.get(method, method), layer + 1, value)
        for record in records
        for method, values in (record.get("layer_entropy") or {}).items()
        for layer, value in enumerate(values)
        if value is not None
    ]
    if not rows:
        return None
    order = [LAYER_LINES.get(m, m) for m in METHODS if any(LAYER_LINES.get(m, m) == r[0] for r in rows)]
    data = pd.DataFrame(rows, columns=["map", "layer", "normalised entropy"])
    figure = Figure(figsize=(6.4, 3.6))
    ax = figure.add_axes((0.1, 0.3, 0.87, 0.66))
    sns.lineplot(data=data, x="layer", y="normalised entropy", hue="map", hue_order=order, estimator="mean",
                 errorbar=("pi", 100), marker="o", markersize=4, ax=ax)
    layers = int(data["layer"].max())
    ax.set_xticks(range(1, layers + 1) if layers <= 16 else range(1, layers + 1, -(-layers // 12)))
    ax.set_xlim(0.5, layers + 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("normalised entropy")
    ax.legend(title=None, fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    return figure


#: The leaderboard figure's panels: curve kind and title.
LEADERBOARD_PANELS = (
    ("deletion", "Deletion (lower is better)"),
    ("insertion", "Insertion (higher is better)"),
)


def _mean_and_sd(values) -> tuple[float, float]:
    """One standard deviation either side of the mean (over the images, as the leaderboard's ±)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean() - values.std()), float(values.mean() + values.std())


def leaderboard_data(records: list[dict]) -> dict | None:
    """What the leaderboard figure draws, from the evaluated image records (fresh and cached
    alike): per curve kind, each map's area in each image and the random orders' mean area in
    each image. None when no image was evaluated."""
    evaluated = [r["evaluation"] for r in records if not r.get("error") and r.get("evaluation")]
    if not evaluated:
        return None
    # An image without objects has no object maps: each map over the images that have it.
    names = list(dict.fromkeys(name for e in evaluated for name in e["maps"]))
    return {
        "maps": names,
        "areas": {kind: {name: [e["auc"][name][kind] for e in evaluated if name in e["auc"] and e["auc"][name][kind] is not None]
                         for name in names}
                  for kind, _ in LEADERBOARD_PANELS},
        "random": {kind: [e["random"][kind]["auc_mean"] for e in evaluated] for kind, _ in LEADERBOARD_PANELS},
    }


def leaderboard_figure(data: dict):
    """The leaderboard as a seaborn dot plot (:func:`leaderboard_data`'s numbers): a panel per
    curve, a row per map, its mean area over the images with one standard deviation either side,
    and the random orders' mean as a dashed line with its standard deviation shaded."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    names = data["maps"]
    rows = [(kind, name, area) for kind, maps in data["areas"].items() for name, areas in maps.items() for area in areas]
    frame = pd.DataFrame(rows, columns=["curve", "map", "area"])
    height = 1.45 + 0.32 * len(names)  # inches: titles, axis labels and the legend, then a row per map
    figure = Figure(figsize=(8.0, height))
    axes = figure.subplots(1, len(LEADERBOARD_PANELS), sharey=True)
    for ax, (kind, title) in zip(axes, LEADERBOARD_PANELS):
        low, high = _mean_and_sd(data["random"][kind])
        ax.axvspan(low, high, color="0.88", linewidth=0, label="random orders ± 1 s.d.")
        ax.axvline((low + high) / 2, color="0.45", linestyle="--", linewidth=1.2, label="random orders (mean)")
        sns.pointplot(data=frame[frame["curve"] == kind], x="area", y="map", order=names, estimator="mean",
                      errorbar=_mean_and_sd, linestyle="none", marker="o", markersize=5, color="C0",
                      err_kws={"linewidth": 1.5}, legend=False, ax=ax)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("area under the curve (score / unperturbed)", fontsize=8)
        ax.set_ylabel("")
        ax.tick_params(labelsize=8)
        ax.grid(True, axis="x", linewidth=0.4, color="0.9")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=7, loc="lower center", ncol=2, frameon=False)
    figure.subplots_adjust(left=0.19, right=0.98, bottom=0.95 / height, top=1 - 0.3 / height, wspace=0.06)
    return figure


def figure_index(
    prefix: str, methods: tuple[str, ...], layers: int, heads: int, objects: int, norms: bool = False, targets: int = 1,
    object_targets: int = 0, evaluation: bool = False, sanity: bool = False, *, grid: tuple[int, int],
) -> dict:
    """The ``figures`` entry of an image's record: the relative path of each figure it gets, and
    the explorer sprite's layout. The only place figure file names are made (the build cache
    checks a reused record against it).

    Args:
        prefix: the relative URL of the image's figure folder from the site root.
        methods: the map methods that ran, in order (each map gets a tile of the map sprite,
            :func:`write_map_sprite`, named by its spec's figure stem).
        layers / heads: layers and heads of the model.
        objects: how many objects the image has (the boxes' figure from 1).
        norms: the explorer ends with a column of token norms per layer.
        targets: how many class (or label-free) targets the methods that explain one have maps for.
        object_targets: how many objects they have maps for.
        evaluation: the image's maps were evaluated (the perturbation curves' figure).
        sanity: the sanity check ran on the image (its figure).
        grid: the model's patch grid (rows, cols): with ``attention``, the patch explorer's
            sprite (:func:`write_patch_sprite`) holds its last ``patch_layers(layers, grid)`` layers.
            The map sprite's tiles are laid out for it too.
    """
    figures: dict = {
        "original": f"{prefix}/original.jpg",
        "thumbnail": f"{prefix}/thumb.jpg",
        "input": f"{prefix}/input.jpg",
    }
    columns, explorer = 0, {"mean_column": None, "rollout_column": None}
    tiles: dict[str, int] = {}
    for name in methods:
        spec = METHODS[name]
        for _map, stem in method_maps(name, targets, object_targets):
            tiles[figure_key(stem)] = len(tiles)
        if spec.explorer == "heads+mean":
            columns += int(heads)
            explorer[f"{name}_column" if name != "attention" else "mean_column"] = columns
        else:
            explorer[f"{name}_column"] = columns
        columns += 1
    if norms:
        explorer["norms_column"] = columns
        columns += 1
    if tiles:
        scale = map_tile_scale(grid)
        figures["overlays"] = {
            "sprite": f"{prefix}/maps.png",
            "tiles": tiles,
            "tile_width": int(grid[1]) * scale,
            "tile_height": int(grid[0]) * scale,
            "gutter": MAP_TILE_GUTTER,
        }
    if "attention" in methods:
        figures["tokens"] = f"{prefix}/tokens.png"
        kept = patch_layers(int(layers), grid)
        figures["patches"] = {
            "sprite": f"{prefix}/patches.png",
            "rows": int(grid[0]),
            "cols": int(grid[1]),
            "layers": kept,
            "first_layer": int(layers) - kept + 1,  # from 1
        }
    figures["explorer"] = {
        "sprite": f"{prefix}/explorer.png",
        "layers": int(layers),
        "heads": int(heads),
        "columns": columns,
        **explorer,
    }
    if objects:
        figures["objects"] = f"{prefix}/objects.jpg"
    if evaluation:
        figures["evaluation"] = f"{prefix}/evaluation.png"
    if evaluation and sanity:
        figures["sanity"] = f"{prefix}/sanity.png"
    return figures


def figure_files(figures: dict) -> list[str]:
    """The relative paths of the files in a :func:`figure_index`."""
    sprites = [figures[name]["sprite"] for name in ("explorer", "patches", "overlays") if name in figures]
    return [value for value in figures.values() if isinstance(value, str)] + sprites


def write_image_figures(
    result,
    root: Path,
    prefix: str,
    cmap: str,
    num_prefix_tokens: int,
    heads: int,
    scale: ScaleSetting = ScaleSetting(),
) -> dict:
    """Write every figure of one :class:`~reportgen.experiments.ImageResult`.

    Args:
        result: the image's results (with its original image and the model's view of it).
        root: the (staging) site folder; every file is written through :mod:`reportgen.outdir`.
        prefix: the relative path of the image's figure folder in ``root`` (and its URL).
        cmap: the maps' colour map (their opacity over the image is the pages', so no figure
            depends on it).
        num_prefix_tokens: prefix tokens at the start of the token map.
        heads: attention heads of the model.
        scale: the colour scale of the maps (the image's record names the same scales).

    Returns:
        The image's :func:`figure_index`.
    """
    outputs = result.methods
    objects = result.objects.objects if result.objects is not None else []
    stack = np.concatenate([output.layers for output in outputs.values()], axis=1)
    norms = result.norms.patches[:, None] if result.norms is not None else None  # [L, 1, rows, cols]
    figures = figure_index(
        prefix, tuple(outputs), stack.shape[0], heads, len(objects), norms is not None, result.target_count,
        result.object_target_count, result.evaluation is not None, grid=stack.shape[2:],
        sanity=result.evaluation is not None and result.evaluation.sanity is not None,
    )

    def out(name: str) -> BinaryIO:
        return outdir.open_new(root, figures[name] if isinstance(figures[name], str) else figures[name]["sprite"])

    content_box = result.geometry.content_box()
    scales = result_scales(result, scale)
    shown = shrink(result.original, 768)
    with out("original") as file:
        save_jpeg(shown, file)
    with out("thumbnail") as file:
        save_jpeg(shrink(shown, THUMB_SIDE), file)  # from the smaller copy: 4-40x fewer pixels to filter
    with out("input") as file:
        save_jpeg(result.view, file)
    if "overlays" in figures:
        drawn = [(output.maps[m], scales.maps[m].top) for name, output in outputs.items()
                 for m, _stem in method_maps(name, result.target_count, result.object_target_count)]
        with out("overlays") as file:
            write_map_sprite([heat for heat, _ in drawn], [top for _, top in drawn], cmap, result.view.size, file, content_box)
    if result.attention is not None:
        with out("tokens") as file:
            write_token_map(result.attention.token_attention, num_prefix_tokens, cmap, file, scales.tokens.top)
    with out("explorer") as file:
        tops = tile_tops({name: output.layers for name, output in outputs.items()}, scale, result.content.weights > 0)
        if norms is not None:  # token norms: each layer's tile to its own largest norm on the image
            stack = np.concatenate([stack, norms], axis=1)
            tops = np.concatenate([tops, tile_tops({"norms": norms}, ScaleSetting("map"), result.content.weights > 0)], axis=1)
        write_explorer_sprite(stack, cmap, file, padding=result.content.weights == 0, tops=tops)
    if "patches" in figures:
        with out("patches") as file:
            write_patch_sprite(outputs["attention"].extras["patch_attention"], stack.shape[2:], cmap, file, result.content.weights == 0)
    if objects:
        with out("objects") as file:
            # Boxes are in the original image's pixels; the decoded image may be downscaled.
            fx, fy = result.original.width / result.size[0], result.original.height / result.size[1]
            drawn = [(o.label, (o.box[0] * fx, o.box[1] * fy, o.box[2] * fx, o.box[3] * fy), o.score) for o in objects]
            write_boxes(result.original, drawn, file)
    if result.evaluation is not None:
        e = result.evaluation
        with out("evaluation") as file:
            write_curves(e.curves.fractions, e.curves.maps, {kind: (r.mean, r.std) for kind, r in e.random.items()}, file)
        if e.sanity is not None:
            with out("sanity") as file:
                write_sanity(e.sanity.blocks, e.sanity.spearman, file)
    return figures


def _line_style(index: int) -> dict:
    """Colour and dash of the ``index``-th map's line: matplotlib's ten colours, then the same
    colours dashed, dotted, ... so that no two of up to 40 maps look alike."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[index // 10 % 4]}


#: The panels of the curves' figure: curve kind, title, x-axis label.
CURVE_PANELS = (
    ("deletion", "Deletion (most relevant first)", "fraction of patches removed"),
    ("negative", "Negative (least relevant first)", "fraction of patches removed"),
    ("insertion", "Insertion (most relevant first)", "fraction of patches inserted"),
)


def write_curves(
    fractions: np.ndarray, maps: dict[str, dict[str, np.ndarray]], random: dict[str, tuple[np.ndarray, np.ndarray]],
    path: Destination,
) -> None:
    """The perturbation curves of one image: a panel per kind of curve, one line per map and the
    random orders' mean with a band of one standard deviation."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.0, 2.8))
    axes = figure.subplots(1, len(CURVE_PANELS), sharey=True)
    for ax, (kind, title, xlabel) in zip(axes, CURVE_PANELS):
        mean, std = random[kind]
        ax.fill_between(fractions, mean - std, mean + std, color="0.8", linewidth=0, label="random ± 1 s.d.")
        ax.plot(fractions, mean, color="0.45", linestyle="--", linewidth=1.2, label="random (mean)")
        for i, (name, curves) in enumerate(maps.items()):
            ax.plot(fractions, curves[kind], **_line_style(i), linewidth=1.5, marker="o", markersize=2.5, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_xlim(0.0, 1.0)
        ax.tick_params(labelsize=7)
        ax.grid(True, linewidth=0.4, color="0.9")
    axes[0].set_ylabel("score / unperturbed", fontsize=8)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    figure.subplots_adjust(left=0.07, right=0.8, bottom=0.18, top=0.88, wspace=0.08)
    save_figure(figure, path)


def write_sanity(blocks: tuple[int, ...], spearman: dict[str, np.ndarray], path: Destination) -> None:
    """The cascading randomisation of one image: each map's Spearman ρ with its original after each
    step (x: how many blocks are re-initialised, from the top; the step's block named), one line
    per map, with the threshold above which a map is flagged."""
    from matplotlib.figure import Figure

    from reportgen.methods.evaluation import SANITY_THRESHOLD

    figure = Figure(figsize=(6.4, 3.0))
    ax = figure.subplots()
    steps = np.arange(1, len(blocks) + 1)
    ax.axhline(SANITY_THRESHOLD, color="0.45", linestyle="--", linewidth=1.0, label=f"flagged above {SANITY_THRESHOLD:g}")
    ax.axhline(0.0, color="0.8", linewidth=0.8)
    for i, (name, values) in enumerate(spearman.items()):
        # NaN (a constant map) leaves a gap, not a made-up value.
        ax.plot(steps, np.asarray(values, dtype=np.float64), **_line_style(i), linewidth=1.5, marker="o",
                markersize=3, label=name)
    ax.set_xticks(steps, [str(step) for step in steps])
    ax.set_xlabel(f"blocks re-initialised, from the top (block {blocks[0]} first, block {blocks[-1]} last)", fontsize=8)
    ax.set_ylabel("Spearman ρ with the original", fontsize=8)
    ax.set_ylim(-1.05, 1.05)
    ax.tick_params(labelsize=7)
    ax.grid(True, linewidth=0.4, color="0.9")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    figure.subplots_adjust(left=0.1, right=0.72, bottom=0.17, top=0.95)
    save_figure(figure, path)
