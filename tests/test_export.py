"""``reportgen export``: print-ready figures of one image, from a site or from a manifest.

The files are checked as files (a PNG's pixels and dpi, a PDF's structure and page size, an SVG
opened by headless Chromium), byte for byte across two exports, and the figure's labels against
values computed here from results.json's grids.
"""

import json
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_manifest, write_photo
from PIL import Image

from reportgen.cli import main


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    write_photo(folder / "one.png", (48, 40), seed=1)
    write_photo(folder / "two.png", (40, 64), seed=2)
    manifest = write_manifest(
        folder,
        [{"path": "one.png", "id": "one", "title": "One costs $5"},
         {"path": "two.png", "id": "two", "kind": "multi", "objects": [{"label": "a", "box": [0, 0, 20, 20]}]}],
        methods=["attention", "rollout", "gradcam"],
    )
    out = folder / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def _export(source, out, *args):
    return CliRunner().invoke(main, ["export", str(source), "-o", str(out), *args])


@pytest.mark.parametrize("fmt", ["svg", "pdf", "png"])
def test_export_is_byte_reproducible(site, tmp_path, fmt):
    first, second = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
    for out in (first, second):
        result = _export(site, out, "--image", "one", "--format", fmt, "--dpi", "72")
        assert result.exit_code == 0, result.output
    assert first.read_bytes() == second.read_bytes()
    data = first.read_bytes()
    assert b"CreationDate" not in data and not re.search(rb"<dc:date>", data)


def _pdf_page_points(data: bytes) -> tuple[float, float]:
    """Check a PDF's structure by hand: the header, the end marker, the cross-reference table
    that startxref points to, and every in-use object at the offset the table gives. Returns
    the page's size in points (its MediaBox)."""
    assert data.startswith(b"%PDF-1.")
    assert data.rstrip().endswith(b"%%EOF")
    start = int(re.search(rb"startxref\s+(\d+)\s+%%EOF\s*$", data).group(1))
    assert data[start:start + 4] == b"xref"
    header = re.match(rb"xref\s+(\d+)\s+(\d+)\s*\n", data[start:])
    first, count = int(header.group(1)), int(header.group(2))
    table = data[start + header.end():]
    for number in range(first, first + count):
        offset, _generation, kind = table[20 * (number - first):20 * (number - first) + 18].split()
        if kind == b"n":
            assert re.match(rb"%d 0 obj" % number, data[int(offset):]), f"object {number} is not at its offset"
    box = re.search(rb"/MediaBox\s*\[\s*0\s+0\s+([\d.]+)\s+([\d.]+)\s*\]", data)
    return float(box.group(1)), float(box.group(2))


def test_png_pdf_and_svg_have_the_same_size_at_the_asked_dpi(site, tmp_path):
    pdf = tmp_path / "f.pdf"
    assert _export(site, pdf, "--image", "two", "--format", "pdf").exit_code == 0
    width, height = _pdf_page_points(pdf.read_bytes())
    inches = (width / 72, height / 72)
    assert 5 < inches[0] < 12 and 3 < inches[1] < 12  # four panels of 2.4 inches and a caption
    svg = tmp_path / "f.svg"
    assert _export(site, svg, "--image", "two", "--format", "svg").exit_code == 0
    size = re.search(r'<svg [^>]*width="([\d.]+)pt" height="([\d.]+)pt"', svg.read_text())
    assert (float(size.group(1)), float(size.group(2))) == pytest.approx((width, height), abs=0.01)
    for dpi in (100, 150):
        out = tmp_path / f"f{dpi}.png"
        assert _export(site, out, "--image", "two", "--format", "png", "--dpi", str(dpi)).exit_code == 0
        with Image.open(out) as png:
            png.load()  # the whole file decodes
            assert png.format == "PNG"
            # PNG stores whole pixels per metre: 150 dpi is 5906 per metre, read back as 150.012
            assert png.info["dpi"] == pytest.approx((dpi, dpi), abs=0.02)
            # The PDF's page at this dpi, to the pixel (a fractional pixel is rounded).
            assert png.size[0] == pytest.approx(inches[0] * dpi, abs=1)
            assert png.size[1] == pytest.approx(inches[1] * dpi, abs=1)


def test_colour_bars_are_labelled_with_each_maps_top_value_and_the_caption_names_method_and_target(site):
    from reportgen.export import read_site
    from reportgen.site.export import export_figure, export_maps

    data = read_site(site, "one")
    results = json.loads((site / "results.json").read_text())
    image = next(i for i in results["images"] if i["id"] == "one")
    weights = np.asarray(image["content"]["weights"])
    figure = export_figure("One costs $5", data.view, export_maps(data.record, data.run), data.run, weights)
    grids = {"attention/mean": image["attention"]["cls_mean"], "attention/max": image["attention"]["cls_max"],
             "rollout": image["rollout"]["rollout"], "gradcam": image["maps"]["gradcam"]["grid"]}
    # Colour-bar axes are the short ones: their tick labels read 0, the middle and the map's top,
    # which under the default scale is the map's largest value on the image.
    bars = [ax for ax in figure.axes if ax.get_position().height < 0.05]
    titles = [ax.get_title().split("\n")[0] for ax in figure.axes if ax.get_title()]
    assert titles == ["model input, 32×32 px", *grids]
    assert len(bars) == len(grids)
    for bar, (name, grid) in zip(bars, grids.items()):
        top = float(np.max(np.asarray(grid)[weights > 0]))
        labels = [t.get_text() for t in bar.get_xticklabels()]
        assert labels == ["0", f"{top / 2:.3g}", f"{top:.3g}"], name
    caption = " ".join(t.get_text() for t in figure.texts).replace("\n", " ")
    assert "One costs $5" in caption
    target = image["maps"]["gradcam"]["target"]
    assert "gradcam (method gradcam)" in caption
    assert f"Explains class {target['class_index']}" in caption and f"logit {target['score']:.3f}" in caption
    for name in grids:
        assert f"{name} (method {name.split('/')[0]})" in caption


def test_export_from_a_manifest_runs_the_model_on_that_image(site, tmp_path):
    """The manifest's one image, recomputed: the same maps as the site's (the same seeded random
    weights), drawn on the exact model input rather than the site's JPEG of it."""
    from reportgen.export import compute, read_site

    manifest = site.parent / "manifest.yaml"
    out = tmp_path / "m.png"
    result = _export(manifest, out, "--image", "one", "--format", "png", "--dpi", "50")
    assert result.exit_code == 0, result.output
    with Image.open(out) as png:
        assert png.format == "PNG"
    computed, stored = compute(manifest, "one", "cpu"), read_site(site, "one")
    for key in ("cls_mean", "cls_max"):
        np.testing.assert_allclose(computed.record["attention"][key], stored.record["attention"][key], rtol=1e-5, atol=1e-9)
    assert computed.view.size == stored.view.size


def test_unknown_image_lists_the_ids(site, tmp_path):
    for source in (site, site / "results.json", site.parent / "manifest.yaml"):
        result = _export(source, tmp_path / "x.svg", "--image", "three")
        assert result.exit_code == 1
        assert "no image with id 'three'" in result.output and "'one', 'two'" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "x.svg").exists()


@pytest.mark.parametrize("args, message", [
    (["--format", "jpg"], "Invalid value for '--format': expected one of svg, pdf, png, got 'jpg'"),
    (["--dpi", "0"], "Invalid value for '--dpi': expected a positive integer, got 0"),
    (["--dpi", "100000"], "Invalid value for '--dpi': 100000 is too large (at most 1200)"),
])
def test_bad_format_or_dpi_is_a_usage_error(site, tmp_path, args, message):
    result = _export(site, tmp_path / "x", "--image", "one", *args)
    assert result.exit_code == 2
    assert message in result.output


@pytest.fixture
def copy(site, tmp_path):
    copied = tmp_path / "site"
    shutil.copytree(site, copied)
    return copied


def _tamper(site, change):
    path = site / "results.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["images"][0]["attention"]["cls_mean"].pop(), "images[0] (id 'one'): map 'attention/mean': is not 4x4, the model's patch grid"),
    (lambda d: d["images"][0]["attention"]["cls_max"][0].__setitem__(0, "x"), "images[0] (id 'one').attention.cls_max.0.0"),
    (lambda d: d["images"][0]["figures"].__setitem__("input", "../../etc/passwd"), "images[0] (id 'one').figures.input: is not 'figures/one/input.jpg'"),
    (lambda d: d["images"][0]["scales"]["maps"].pop("rollout"), "images[0] (id 'one').scales.maps.rollout: missing"),
    (lambda d: d["settings"].__setitem__("cmap", "no-such-map"), "settings.cmap:"),
    (lambda d: d["settings"].__setitem__("methods", ["attention", "attention"]), "settings.methods:"),
    (lambda d: d.__setitem__("format", 99), "format: 99 is not 3"),
    (lambda d: d["model"].__setitem__("grid", [4]), "model.grid"),
])
def test_a_tampered_site_is_refused_naming_file_and_key(copy, tmp_path, change, message):
    _tamper(copy, change)
    result = _export(copy, tmp_path / "x.svg", "--image", "one")
    assert result.exit_code == 1, result.output
    assert str(copy / "results.json") in result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_site_whose_input_is_a_link_or_missing_or_not_json_is_refused(copy, tmp_path):
    view = copy / "figures" / "one" / "input.jpg"
    view.unlink()
    view.symlink_to(copy / "figures" / "two" / "input.jpg")
    result = _export(copy, tmp_path / "x.svg", "--image", "one")
    assert result.exit_code == 1 and "is a symbolic link" in result.output
    view.unlink()
    result = _export(copy, tmp_path / "x.svg", "--image", "one")
    assert result.exit_code == 1 and "input.jpg: missing" in result.output
    (copy / "results.json").write_text('{"format": 3, "images": [NaN]}')
    result = _export(copy, tmp_path / "x.svg", "--image", "one")
    assert result.exit_code == 1 and "NaN is not a number results.json holds" in result.output
    (copy / "results.json").write_text('{"format": 3,\n "images": [}')
    result = _export(copy, tmp_path / "x.svg", "--image", "one")
    assert result.exit_code == 1 and "not valid JSON (line 2" in result.output


@pytest.mark.parametrize("source", [(451, 300), (300, 451), (640, 427), (50, 400), (224, 224), (1000, 10)])
def test_the_letterbox_is_recovered_from_the_patch_weights_results_json_keeps(source):
    """A site keeps each patch's image fraction (7 significant digits), not the content box: the
    export recovers the box, to the pixel, for letterboxed landscape and portrait photos."""
    from reportgen.imaging import plan_geometry
    from reportgen.site.export import content_box
    from reportgen.site.records import plain

    config = {"input_size": (3, 224, 224), "crop_pct": 1.0, "crop_mode": "border"}
    box = plan_geometry(source, config).content_box()
    # Each 14-px patch's covered fraction, by hand, rounded as results.json rounds it.
    edges = np.arange(17) * 14.0
    cover_x = np.clip(np.minimum(edges[1:], box[2]) - np.maximum(edges[:-1], box[0]), 0, None) / 14
    cover_y = np.clip(np.minimum(edges[1:], box[3]) - np.maximum(edges[:-1], box[1]), 0, None) / 14
    weights = np.asarray(plain(np.outer(cover_y, cover_x)))
    assert content_box(weights, (14, 14)) == box
