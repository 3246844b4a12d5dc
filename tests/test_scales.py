"""Colour scales (output.scale): unit values of hand-made maps under each scale, the explorer and
the notebook panels on the same scale, the config rule, and a built site that names its scales."""

from __future__ import annotations

import html
import json
import re

import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_MODEL, map_tile, write_manifest, write_photo
from PIL import Image
from sitecheck import disagreements

import reportgen
from reportgen.cli import main
from reportgen.config import load_manifest
from reportgen.errors import ManifestError
from reportgen.site import figures
from reportgen.site.scales import Scale, ScaleSetting, image_scales, map_scale, tile_tops

# One dominant patch: 100 against 1..9 (a 2 x 5 map).
DOMINANT = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 100]], dtype=np.float32)


def _unit(heat, scale: Scale) -> np.ndarray:
    return figures.heat_to_unit(heat, scale.top)


def _rgb(cmap: str, unit) -> np.ndarray:
    levels = np.round(np.asarray(unit, dtype=np.float64) * 255).astype(int)
    return np.round(matplotlib.colormaps[cmap](levels)[..., :3] * 255)


# --------------------------------------------------------------------------------------------
# Unit values against hand computations
# --------------------------------------------------------------------------------------------


def test_per_map_maximum_leaves_the_second_patch_near_zero():
    scale = map_scale(DOMINANT, ScaleSetting("map"))
    assert (scale.kind, scale.top, scale.above) == ("map", 100.0, 0)
    unit = _unit(DOMINANT, scale)
    assert unit[1, 3] == pytest.approx(9 / 100)  # the second-largest patch: 0.09
    assert unit[1, 4] == 1.0


def test_percentile_clips_the_dominant_patch():
    # 90th percentile of 10 values, linear: position 0.9 * 9 = 8.1 in the sorted values,
    # 9 + 0.1 * (100 - 9) = 18.1.
    scale = map_scale(DOMINANT, ScaleSetting("percentile", 90))
    assert scale.kind == "percentile"
    assert scale.top == pytest.approx(18.1)
    assert scale.above == 1  # only the 100 lies above
    unit = _unit(DOMINANT, scale)
    assert unit[1, 3] == pytest.approx(9 / 18.1)  # about 0.497, no longer near 0
    assert unit[0, 0] == pytest.approx(1 / 18.1)
    assert unit[1, 4] == 1.0  # shown at the top colour
    # The 100th percentile is the maximum: nothing above it.
    assert map_scale(DOMINANT, ScaleSetting("percentile", 100)) == Scale("percentile", 100.0, 0)


def test_percentile_of_zero_falls_back_to_the_maximum_and_says_so():
    sparse = np.zeros((4, 5), dtype=np.float32)
    sparse[0, 0] = 0.5  # 19 of 20 patches are 0: the 90th percentile (position 17.1) is 0
    assert map_scale(sparse, ScaleSetting("percentile", 90)) == Scale("map", 0.5, 0)
    assert map_scale(np.zeros((2, 2)), ScaleSetting("percentile", 99)) == Scale("map", 0.0, 0)
    assert (figures.heat_to_unit(np.zeros((2, 2)), 0.0) == 0).all()


def test_shared_scale_makes_two_maps_of_an_image_comparable():
    half = DOMINANT / 2
    scales = image_scales({"a": DOMINANT, "b": half}, None, {}, ScaleSetting("shared")).maps
    assert scales["a"] == scales["b"] == Scale("shared", 100.0, 0)
    a, b = _unit(DOMINANT, scales["a"]), _unit(half, scales["b"])
    np.testing.assert_allclose(b, a / 2)
    # Colour index: 255 for the dominant patch of a, 127.5 -> 128 for b's (half of it).
    index = lambda unit: np.round(unit * 255).astype(int)  # noqa: E731
    assert index(a)[1, 4] == 255 and index(b)[1, 4] == 128
    # Per map, both would be drawn at the top colour: the factor of two is lost.
    own = image_scales({"a": DOMINANT, "b": half}, None, {}, ScaleSetting("map")).maps
    assert index(_unit(half, own["b"]))[1, 4] == 255


def test_the_token_map_is_never_in_a_family():
    tokens = np.array([[0.2, 0.8], [0.5, 0.5]])
    shared = image_scales({"a": DOMINANT}, tokens, {}, ScaleSetting("shared"))
    assert shared.tokens == Scale("map", 0.8, 0)
    # 99th percentile of [0.2, 0.5, 0.5, 0.8]: position 2.97, 0.5 + 0.97 * 0.3 = 0.791.
    assert image_scales({"a": DOMINANT}, tokens, {}, ScaleSetting("percentile")).tokens.top == pytest.approx(0.791)


# --------------------------------------------------------------------------------------------
# Figures drawn on the scale
# --------------------------------------------------------------------------------------------


def test_shared_explorer_tiles_share_one_maximum_per_method(tmp_path):
    rng = np.random.default_rng(0)
    attention = rng.uniform(0.01, 1, (2, 3, 2, 4)).astype(np.float32)  # [L, K, rows, cols]
    attention[1, 0] *= 0.25  # a weak head: darker than the others, not stretched to full colour
    rolled = rng.uniform(0.01, 0.1, (2, 1, 2, 4)).astype(np.float32)
    setting = ScaleSetting("shared")
    tops = tile_tops({"attention": attention, "rollout": rolled}, setting)
    figures.write_explorer_sprite(np.concatenate([attention, rolled], axis=1), "viridis", tmp_path / "e.png", tops=tops)
    sheet = np.asarray(Image.open(tmp_path / "e.png").convert("RGB")).astype(int)
    attention_top, rollout_top = float(attention.max()), float(rolled.max())
    for layer in range(2):
        for column in range(4):
            tile = attention[layer, column] if column < 3 else rolled[layer, 0]
            top = attention_top if column < 3 else rollout_top
            got = sheet[layer * 2 : layer * 2 + 2, column * 4 : column * 4 + 4]
            assert np.abs(got - _rgb("viridis", np.clip(tile / top, 0, 1))).max() <= 1, (layer, column)


def test_percentile_explorer_tiles_clip_each_tile_at_its_own_percentile(tmp_path):
    stack = np.stack([DOMINANT, DOMINANT * 3])[None].astype(np.float32)  # one layer, two tiles
    tops = tile_tops({"m": stack}, ScaleSetting("percentile", 90))
    np.testing.assert_allclose(tops, [[18.1, 54.3]], rtol=1e-6)
    figures.write_explorer_sprite(stack, "magma", tmp_path / "e.png", tops=tops)
    sheet = np.asarray(Image.open(tmp_path / "e.png").convert("RGB")).astype(int)
    expected = _rgb("magma", np.clip(DOMINANT / 18.1, 0, 1))
    assert np.abs(sheet[:, :5] - expected).max() <= 1 and np.abs(sheet[:, 5:] - expected).max() <= 1


def test_overlay_under_a_top_blends_the_colours_of_that_scale():
    view = Image.new("RGB", (5, 2), (0, 0, 0))
    drawn = np.asarray(figures.overlay(view, DOMINANT, "inferno", 1.0, top=18.1)).astype(int)
    expected = _rgb("inferno", np.clip(DOMINANT / 18.1, 0, 1))  # one pixel per patch: no resampling
    assert np.abs(drawn - expected).max() <= 1


# --------------------------------------------------------------------------------------------
# The setting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output, expected", [
    ({"scale": "max"}, "output.scale: expected one of map, shared, percentile, got 'max'"),
    ({"scale": 99}, "output.scale: expected one of map, shared, percentile, got 99"),
    ({"scale": "percentile", "scale_percentile": 50}, "output.scale_percentile: must satisfy 50 < value <= 100, got 50"),
    ({"scale_percentile": 100.5}, "output.scale_percentile: must satisfy 50 < value <= 100, got 100.5"),
    ({"scale_percentile": "high"}, "output.scale_percentile: expected a number, got 'high'"),
])
def test_bad_scales_are_located_manifest_errors(tmp_path, output, expected):
    write_photo(tmp_path / "a.png")
    with pytest.raises(ManifestError) as info:
        load_manifest(write_manifest(tmp_path, [{"path": "a.png"}], output=output))
    assert info.value.problems == [expected]


def test_scale_defaults_and_options(tmp_path):
    write_photo(tmp_path / "a.png")
    manifest = load_manifest(write_manifest(tmp_path, [{"path": "a.png"}]))
    assert (manifest.output.scale, manifest.output.scale_percentile) == ("map", 99.0)
    changed = manifest.with_overrides(output={"scale": "percentile", "scale_percentile": 95})
    assert (changed.output.scale, changed.output.scale_percentile) == ("percentile", 95.0)
    for args, expected in [(["--scale", "max"], "Invalid value for '--scale': expected one of map, shared, percentile"),
                           (["--scale-percentile", "40"], "Invalid value for '--scale-percentile': must satisfy 50 < value <= 100")]:
        result = CliRunner().invoke(main, ["build", str(tmp_path / "manifest.yaml"), "-o", str(tmp_path / "out"), "--quiet", *args])
        assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output


def test_explainer_refuses_a_bad_scale_and_titles_panels_with_it(tmp_path):
    tiny = dict(pretrained=False, input_size=TINY_MODEL["input_size"], options=TINY_MODEL["options"], device="cpu")
    with pytest.raises(ValueError, match=r"output.scale_percentile: must satisfy 50 < value <= 100, got 20"):
        reportgen.Explainer(TINY_MODEL["name"], scale="percentile", scale_percentile=20, **tiny)
    explained = reportgen.Explainer(TINY_MODEL["name"], scale="shared", **tiny).explain(write_photo(tmp_path / "a.png"))
    top = max(float(m.max()) for m in explained.maps.values())
    figure = explained.figure()
    titles = [ax.get_title() for ax in figure.axes[1:]]
    assert all(f"colour 0 to {top:.4f}, shared by every map" in title for title in titles), titles
    assert "one colour scale for every map" in figure._suptitle.get_text()


# --------------------------------------------------------------------------------------------
# A built site
# --------------------------------------------------------------------------------------------


def _text(page) -> str:
    """A page's text as read: tags gone, white space collapsed, none before punctuation."""
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8"))).split())
    return re.sub(r"\( ", "(", re.sub(r" ([,.:;)])", r"\1", text))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scales")
    write_photo(folder / "a.png", (48, 40), seed=1)
    write_photo(folder / "b.png", (64, 30), seed=2)
    return folder


def _build(folder, name, **output):
    manifest = write_manifest(folder, [{"path": "a.png"}, {"path": "b.png"}], output=output)
    out = folder / name
    report = reportgen.build(manifest, out, device="cpu")
    assert not report.failed
    return out, report, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_a_shared_site_names_one_top_per_image_and_agrees_with_results(photos):
    out, _, results = _build(photos, "shared", scale="shared")
    assert results["settings"]["scale"] == "shared" and results["settings"]["scale_percentile"] is None
    for image in results["images"]:
        grids = [image["attention"]["cls_mean"], image["attention"]["cls_max"], image["rollout"]["rollout"]]
        top = max(max(max(row) for row in grid) for grid in grids)  # by hand, from the maps themselves
        assert {s["kind"] for s in image["scales"]["maps"].values()} == {"shared"}
        assert all(s["top"] == pytest.approx(top, abs=1e-6) for s in image["scales"]["maps"].values())
        heads = np.asarray(image["attention"]["cls_heads"])
        assert image["scales"]["explorer"]["attention"]["top"] >= heads.max() - 1e-6
        text = _text(out / image["page"])
        assert f"Colour from 0 to {top:.4f}, one scale shared by this image's overlays." in text
        assert f"{top:.4f}: one scale for the maps above." in text  # the colour bar's label
    checked, problems = disagreements(out)
    assert problems == [] and checked > 50


def test_a_percentile_site_names_each_maps_percentile(photos):
    out, _, results = _build(photos, "percentile", scale="percentile", scale_percentile=90)
    assert (results["settings"]["scale"], results["settings"]["scale_percentile"]) == ("percentile", 90.0)
    image = results["images"][0]
    grid = np.sort(np.asarray(image["rollout"]["rollout"], dtype=np.float64).ravel())  # 16 patches
    # 90th percentile by hand: position 0.9 * 15 = 13.5, halfway between the 14th and 15th values.
    top = grid[13] + 0.5 * (grid[14] - grid[13])
    scale = image["scales"]["maps"]["rollout"]
    assert scale["kind"] == "percentile" and scale["top"] == pytest.approx(top, abs=2e-6)
    assert scale["above"] == int((grid > scale["top"]).sum()) == 2
    text = _text(out / image["page"])
    assert f"rollout. Colour from 0 to its 90th percentile, {top:.4f} (2 patches above it, shown at the top colour)." in text
    checked, problems = disagreements(out)
    assert problems == [] and checked > 50


def test_a_change_of_scale_redraws_the_figures(photos):
    out, first, results = _build(photos, "redraw", scale="map")
    assert results["images"][0]["scales"]["maps"]["rollout"]["kind"] == "map"
    text = _text(out / results["images"][0]["page"])
    assert "Colour from 0 to the map's maximum," in text and "each map has its own scale" in text
    before = map_tile(out, results["images"][0]["figures"], "cls_mean")
    _, again, _ = _build(photos, "redraw", scale="map")
    assert again.reused == 2
    _, changed, results = _build(photos, "redraw", scale="shared")
    assert changed.reused == 0
    after = map_tile(out, results["images"][0]["figures"], "cls_mean")
    assert not np.array_equal(before, after)  # the mean map is no longer stretched to its own maximum


def test_a_new_opacity_reuses_every_figure_and_reaches_every_map(photos):
    """The pages lay each map over the model input at the run's opacity: no figure holds it, so a
    rebuild with another opacity recomputes nothing, and every map on the page gets the new one."""
    out, _, results = _build(photos, "opacity", alpha=0.5)
    sprite = map_tile(out, results["images"][0]["figures"], "rollout")
    _, again, results = _build(photos, "opacity", alpha=0.8)
    assert again.reused == 2
    np.testing.assert_array_equal(map_tile(out, results["images"][0]["figures"], "rollout"), sprite)
    page = (out / results["images"][0]["page"]).read_text(encoding="utf-8")
    opacities = re.findall(r'src="figures/[^"]+/maps\.png"[^>]*opacity: ([\d.]+)', page)
    # The comparison grid's three maps: the page draws each map once.
    assert opacities == ["0.8"] * 3


def test_scales_are_taken_over_the_image_not_the_padding():
    heat = np.array([[50.0, 50.0, 50.0], [1.0, 2.0, 4.0], [8.0, 3.0, 2.0]])  # row 0: a hot padding band
    inside = np.array([[False] * 3, [True] * 3, [True] * 3])
    assert map_scale(heat, ScaleSetting("map"), inside) == Scale("map", 8.0, 0)
    values = np.array([1.0, 2.0, 4.0, 8.0, 3.0, 2.0])
    assert map_scale(heat, ScaleSetting("percentile", 80), inside) == Scale("percentile", float(np.percentile(values, 80)), 1)
    scales = image_scales({"a": heat, "b": heat / 2}, None, {"m": heat[None, None]}, ScaleSetting("shared"), inside)
    assert scales.maps["a"].top == 8.0 and scales.explorer["m"].top == 8.0
    np.testing.assert_array_equal(tile_tops({"m": heat[None, None]}, ScaleSetting("map"), inside), [[8.0]])
