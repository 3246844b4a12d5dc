"""Figure writers: what they draw, checked against matplotlib's colour maps; same inputs, same bytes."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from PIL import Image

from reportgen.site import figures


def _rgb(cmap: str, unit) -> np.ndarray:
    """Expected colours the way a colour bar reads: 256 levels of the colour map, rounded."""
    levels = np.round(np.asarray(unit, dtype=np.float64) * 255).astype(int)
    return np.round(matplotlib.colormaps[cmap](levels)[..., :3] * 255)


def test_token_map_has_one_pixel_per_token_and_a_line_after_the_prefix(tmp_path):
    rng = np.random.default_rng(0)
    attention = rng.dirichlet(np.ones(5), size=5)  # 1 prefix token + 4 patches
    figures.write_token_map(attention, 1, "viridis", tmp_path / "tokens.png")
    pixels = np.asarray(Image.open(tmp_path / "tokens.png").convert("RGB")).astype(int)
    assert pixels.shape == (6, 6, 3)
    assert (pixels[1] == 255).all() and (pixels[:, 1] == 255).all()
    kept = np.delete(np.delete(pixels, 1, axis=0), 1, axis=1)  # every token keeps its own pixel
    assert np.abs(kept - _rgb("viridis", attention / attention.max())).max() <= 1


def test_explorer_sprite_layout_and_an_all_zero_map(tmp_path):
    layers, heads, rows, cols = 2, 3, 2, 4
    rng = np.random.default_rng(0)
    cls = rng.uniform(0.01, 1, (layers, heads, rows, cols))
    cls[1, 2] = 0.0  # a head with no attention on the patches: drawn as zero, not NaN
    rolled = rng.uniform(0.01, 1, (layers, rows, cols))
    # The columns as the attention and rollout methods give them: heads, their mean, rollout.
    stack = np.concatenate([cls, cls.mean(axis=1, keepdims=True), rolled[:, None]], axis=1)
    figures.write_explorer_sprite(stack, "cividis", tmp_path / "explorer.png")
    sheet = np.asarray(Image.open(tmp_path / "explorer.png").convert("RGB")).astype(int)
    assert sheet.shape == (layers * rows, (heads + 2) * cols, 3)
    for layer in range(layers):
        tiles = [*cls[layer], cls[layer].mean(axis=0), rolled[layer]]
        for column, tile in enumerate(tiles):
            top = tile.max()
            expected = _rgb("cividis", tile / top if top > 0 else np.zeros_like(tile))
            got = sheet[layer * rows : (layer + 1) * rows, column * cols : (column + 1) * cols]
            assert np.abs(got - expected).max() <= 1, (layer, column)


def _bilinear(grid: np.ndarray, k: int) -> np.ndarray:
    """``grid`` sampled at the centres of ``k`` x ``k`` pixels per cell, linear between the cells'
    centres and flat beyond the outer ones (how an image is upsampled bilinearly)."""
    def axis(n):
        x = np.clip((np.arange(n * k) + 0.5) / k - 0.5, 0, n - 1)
        low = np.minimum(np.floor(x).astype(int), n - 2) if n > 1 else np.zeros(n * k, dtype=int)
        return low, x - low
    (r0, fy), (c0, fx) = axis(grid.shape[0]), axis(grid.shape[1])
    r1, c1 = np.minimum(r0 + 1, grid.shape[0] - 1), np.minimum(c0 + 1, grid.shape[1] - 1)
    top = grid[r0][:, c0] * (1 - fx) + grid[r0][:, c1] * fx
    bottom = grid[r1][:, c0] * (1 - fx) + grid[r1][:, c1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def test_map_tiles_have_at_least_three_pixels_per_patch():
    # Odd, so that a pixel lies on each patch centre; never 1, where the browser would blend the
    # colours of neighbouring patches instead of colouring interpolated values.
    assert [figures.map_tile_scale((n, n)) for n in (3, 14, 16, 24, 25, 37)] == [17, 3, 3, 3, 3, 3]


def test_map_sprite_holds_each_map_on_its_own_scale_with_gutters(tmp_path):
    rows, cols = 3, 4
    rng = np.random.default_rng(5)
    ramp = rng.uniform(0, 2, (rows, cols))
    heats = [ramp, np.zeros((rows, cols)), np.full((rows, cols), 7.0)]
    tops = [1.5, 0.0, 7.0]  # the ramp clipped at 1.5; an all-zero map; a flat map at its top
    figures.write_map_sprite(heats, tops, "viridis", (40, 30), tmp_path / "maps.png")
    sheet = np.asarray(Image.open(tmp_path / "maps.png")).astype(int)
    k, g = figures.map_tile_scale((rows, cols)), figures.MAP_TILE_GUTTER
    assert k == 13 and sheet.shape == (rows * k + 2 * g, 3 * (cols * k + 2 * g), 3)  # odd: a sample on each patch centre
    width = cols * k + 2 * g
    for i, (heat, top) in enumerate(zip(heats, tops)):
        cell = sheet[:, i * width : (i + 1) * width]
        tile = cell[g:-g, g:-g]
        # Clipped at the top, then upsampled (as the overlay of figures.overlay).
        unit = _bilinear(np.clip(heat / top, 0, 1), k) if top > 0 else np.zeros((rows * k, cols * k))
        # One level of the colour map either way: the map is resampled in float32.
        assert np.abs(tile - _rgb("viridis", unit)).max() <= 4, i
        # The gutter repeats the tile's edge, so smoothing at the edge never reaches the next tile.
        np.testing.assert_array_equal(cell[:g, g:-g], np.repeat(tile[:1], g, axis=0))
        np.testing.assert_array_equal(cell[g:-g, -g:], np.repeat(tile[:, -1:], g, axis=1))
    assert (sheet[:, width : 2 * width] == _rgb("viridis", [0.0])[0]).all()
    assert (sheet[:, 2 * width :] == _rgb("viridis", [1.0])[0]).all()


def test_map_tiles_grey_the_letterbox_padding_by_the_content_box(tmp_path):
    heat = np.random.default_rng(6).uniform(0, 1, (4, 4))
    plain = figures.map_sprite([heat], [1.0], "inferno", (32, 32))
    greyed = figures.map_sprite([heat], [1.0], "inferno", (32, 32), content_box=(0.0, 6.0, 32.0, 26.0))
    g = figures.MAP_TILE_GUTTER
    tile, plain_tile = greyed[g:-g, g:-g].astype(int), plain[g:-g, g:-g].astype(int)
    centres = (np.arange(tile.shape[0]) + 0.5) * 32 / tile.shape[0]  # rows' centres in input pixels
    image = (centres >= 6) & (centres <= 26)
    np.testing.assert_array_equal(tile[image], plain_tile[image])
    assert (tile[~image, :, 0] == tile[~image, :, 1]).all() and (tile[~image, :, 1] == tile[~image, :, 2]).all()
    assert not (plain_tile[~image, :, 0] == plain_tile[~image, :, 1]).all()


def test_a_map_tile_laid_over_the_input_looks_like_the_blended_overlay():
    """The page's composition (the tile scaled smoothly over the input, at the run's opacity) against
    :func:`figures.overlay`, which blends at full size: on the image, within a few levels."""
    rng = np.random.default_rng(7)
    base = np.asarray(Image.fromarray(rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)).resize((224, 224)))
    view = Image.fromarray(base)
    heat = rng.gamma(0.5, 1.0, (14, 14))
    sprite = figures.map_sprite([heat], [float(heat.max())], "inferno", view.size)
    g = figures.MAP_TILE_GUTTER
    tile = Image.fromarray(np.ascontiguousarray(sprite[g:-g, g:-g])).resize(view.size, Image.Resampling.BILINEAR)
    composed = 0.5 * base + 0.5 * np.asarray(tile, dtype=np.float64)
    blended = np.asarray(figures.overlay(view, heat, "inferno", 0.5, top=float(heat.max())), dtype=np.float64)
    difference = np.abs(composed - blended)
    assert difference.mean() < 1.0 and np.percentile(difference, 99) < 6, (difference.mean(), np.percentile(difference, 99))


def _label_layouts():
    """Boxes whose labels collide when each is put by its box's top-left corner: nested boxes from
    the same corner (a flag in front of a person, the whole frame's height), boxes at the top edge,
    and more labels than fit by their boxes."""
    portrait = [("person", (0, 0, 300, 500), 0.99), ("flag", (0, 0, 97, 500), 0.95), ("face", (100, 40, 200, 160), None)]
    top_edge = [(f"thing {i}", (10 * i, 0, 10 * i + 120, 80), None) for i in range(6)]
    crowded = [(f"object {i}", (0, 0, 300, 500), None) for i in range(64)]
    return {"portrait": portrait, "top edge": top_edge, "crowded": crowded}


@pytest.mark.parametrize("name", list(_label_layouts()))
def test_box_labels_never_overlap(name):
    """Where the labels really are, read from the drawing: on a plain purple image, the black pixels
    (the labels' text; no box colour is black) all lie inside the label rectangles, each rectangle
    holds only its box's colour and its text (black, anti-aliased: shades between the colour and
    black), and no two rectangles intersect."""
    boxes = _label_layouts()[name]
    background = (128, 0, 128)  # no shade of any box colour
    canvas, rects = figures.draw_boxes(Image.new("RGB", (300, 500), background), boxes)
    pixels = np.asarray(canvas).astype(int)
    assert len(rects) == len(boxes)
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
        x0, y0, x1, y1 = a
        assert 0 <= x0 < x1 <= canvas.width and 0 <= y0 < y1 <= canvas.height
        colour = np.array(Image.new("RGB", (1, 1), figures.BOX_COLOURS[i % len(figures.BOX_COLOURS)]).getpixel((0, 0)))
        inside = pixels[y0:y1, x0:x1].reshape(-1, 3)
        shade = inside @ colour / (colour @ colour)  # each pixel as a shade t * colour, t in [0, 1]
        on_line = np.abs(inside - shade[:, None] * colour).max(axis=1) <= 3
        assert on_line.all(), boxes[i][0]  # nothing but the label's colour and its text in it
        assert (shade < 0.2).any() and (shade > 0.99).mean() > 0.5, boxes[i][0]  # text on a filled label
    black = pixels.sum(axis=2) == 0
    covered = np.zeros(black.shape, dtype=bool)
    for x0, y0, x1, y1 in rects:
        covered[y0:y1, x0:x1] = True
    assert not (black & ~covered).any()  # no text outside the label rectangles
    if name != "crowded":  # the labels fit by their boxes: the figure is the image's size
        assert canvas.size == (300, 500)
        assert all(y1 <= 500 for _x0, _y0, _x1, y1 in rects)


def test_carried_colour_maps_are_matplotlibs_and_others_come_from_matplotlib():
    from reportgen.colourmaps import carried

    levels = np.linspace(0.0, 1.0, 256)
    names = [f"{name}{suffix}" for name in ("viridis", "plasma", "inferno", "magma", "cividis") for suffix in ("", "_r")]
    assert all(carried(name) for name in names) and not carried("RdBu") and not carried("gray")
    for name in [*names, "RdBu", "gray"]:  # the last two are not carried: read from matplotlib
        expected = np.round(matplotlib.colormaps[name](levels)[:, :3] * 255)
        figures.colour_lut.cache_clear()
        assert np.array_equal(figures.colour_lut(name), expected), name
    figures.colour_lut.cache_clear()


def test_patch_sprite_is_an_indexed_png_with_padding_in_greys(tmp_path):
    # A 2 x 2 grid, one layer: query (r, c)'s tile holds its row of keys; the right column of
    # patches is letterbox padding.
    attention = np.array([[[0.0, 1.0, 2.0, 3.0], [4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 8.0]]])
    padding = np.array([[False, True], [False, True]])
    path = tmp_path / "patches.png"
    figures.write_patch_sprite(attention, (2, 2), "viridis", path, padding)
    image = Image.open(path)
    assert image.mode == "P"
    rgb = np.asarray(image.convert("RGB")).astype(int)
    lut = np.round(matplotlib.colormaps["viridis"](np.linspace(0.0, 1.0, 256))[:, :3] * 255)
    for query in range(4):
        tile = rgb[(query // 2) * 2 : (query // 2) * 2 + 2, (query % 2) * 2 : (query % 2) * 2 + 2].reshape(4, 3)
        unit = attention[0, query] / attention[0, query].max()
        for key in (0, 2):  # image patches: the colour map, in 128 levels (one step is 2 of 256)
            assert np.abs(tile[key] - lut[int(round(unit[key] * 255))]).max() <= 6, (query, key)
        for key in (1, 3):  # padding: grey, brighter for a larger value
            assert tile[key][0] == tile[key][1] == tile[key][2], (query, key)
        if unit[1] != unit[3]:
            assert (tile[1][0] < tile[3][0]) == (unit[1] < unit[3])


def test_png_bytes_refuses_what_it_cannot_encode_faithfully():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    index = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    palette = np.zeros((4, 3), dtype=np.uint8)
    for pixels, colours in ((rgb.astype(np.int64), None), (np.zeros((0, 3, 3), np.uint8), None),  # wrapped values, no rows
                            (index, None), (rgb, palette),  # indices need a palette, RGB takes none
                            (index, palette[:3]), (index, np.zeros((257, 3), np.uint8))):  # index 3 uncovered, too many colours
        with pytest.raises(ValueError, match="png_bytes"):
            figures.png_bytes(pixels, colours)


@pytest.mark.parametrize("shape", [(5, 7, 3), (9, 4)])
def test_png_bytes_decode_to_the_same_pixels_and_repeat_byte_for_byte(tmp_path, shape):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels[2:4] = 17  # a flat run as well as noise
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8) if len(shape) == 2 else None
    data = figures.png_bytes(pixels, palette)
    assert data == figures.png_bytes(pixels.copy(), palette)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with Image.open(path) as image:
        image.verify()  # chunk CRCs
    with Image.open(path) as image:
        assert image.mode == ("RGB" if palette is None else "P") and image.size == (shape[1], shape[0])
        if palette is None:
            np.testing.assert_array_equal(np.asarray(image), pixels)
        else:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), palette[pixels])


@pytest.mark.parametrize("prefix", [0, 2])
def test_token_map_with_every_colour_level_drawn_keeps_each_colour_and_the_white_line(tmp_path, prefix):
    # 17 x 17 tokens at 289 values from 0 to 1: all 256 levels are drawn, none is left for the line.
    attention = np.random.default_rng(1).permutation(np.linspace(0.0, 1.0, 17 * 17)).reshape(17, 17)
    figures.write_token_map(attention, prefix, "magma", tmp_path / "tokens.png")
    pixels = np.asarray(Image.open(tmp_path / "tokens.png").convert("RGB")).astype(int)
    assert pixels.shape == (17 + (prefix > 0), 17 + (prefix > 0), 3)
    if prefix:
        assert (pixels[prefix] == 255).all() and (pixels[:, prefix] == 255).all()
        pixels = np.delete(np.delete(pixels, prefix, axis=0), prefix, axis=1)
    assert np.abs(pixels - _rgb("magma", attention)).max() <= 1


def test_patch_sprite_draws_a_query_that_attends_nowhere_at_the_bottom_colour(tmp_path):
    # One layer over a 1 x 3 grid: query 1 gives every key 0 (its tile has a top of 0).
    attention = np.array([[[1.0, 2.0, 4.0], [0.0, 0.0, 0.0], [3.0, 0.0, 1.0]]], dtype=np.float32)
    path = tmp_path / "patches.png"
    with np.errstate(all="raise"):  # no division by zero on the way
        figures.write_patch_sprite(attention, (1, 3), "viridis", path)
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)  # tiles side by side: 1 row of 3 x 3 keys
    assert rgb.shape == (1, 9, 3)
    for query in range(3):
        row = attention[0, query].astype(np.float64)
        unit = row / row.max() if row.max() > 0 else np.zeros(3)
        assert np.abs(rgb[0, query * 3 : query * 3 + 3] - _rgb("viridis", unit)).max() <= 1, query
