"""Issue 7: bad input, failures and safety, each case fed through the real command line.

A build never loses work (a bad manifest or output folder stops it before anything is touched;
a bad image costs only its own card) and never lets a page do harm (user text is escaped, file
names are derived safely, nothing is written outside the output folder).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_manifest, write_photo
from PIL import Image
from sitecheck import broken_links

from reportgen.cli import main
from reportgen.config import MAX_ID_LENGTH


def _build(manifest, out, *args):
    return CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet", *args])


def _clean_exit(result, code):
    """The exit status is ``code`` and the user saw a message, not a traceback."""
    assert result.exit_code == code, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def _snapshot(folder: Path, skip: tuple[Path, ...] = ()) -> dict[str, bytes | None]:
    """Every file and folder under ``folder`` (except ``skip``), with the bytes of the files."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        found[str(path.relative_to(folder))] = path.read_bytes() if path.is_file() else None
    return found


def _cards(index: Path) -> str:
    return index.read_text(encoding="utf-8")


def _error_card(index: Path, source_name: str) -> str:
    """The text of the failed card for the image file ``source_name`` on the index."""
    html = _cards(index)
    marker = f"<code>{source_name}</code>"
    assert marker in html, f"no card for {source_name}"
    card = html[html.index(marker):]
    return card[: card.index("</li>")]


# --------------------------------------------------------------------------------------------
# Manifest problems: exit 1, message names the manifest file, the entry and the key.
# --------------------------------------------------------------------------------------------

MANIFEST_CASES = {
    "missing file": (None, ["missing.yaml", "manifest file not found"]),
    # (two lines, model and detector, are written above each text)
    "invalid YAML": ('images:\n  - path: ok.png\n    title: "unterminated\n', ["manifest.yaml", "invalid YAML at line 6", "quoted scalar at line 5"]),
    "title not a string": ("images:\n  - {path: ok.png, title: 42}\n", ["images[0] (id 'ok')", "title", "expected a string, got 42"]),
    "kind not a kind": ("images:\n  - {path: ok.png, kind: [single]}\n", ["images[0] (id 'ok')", "kind", "expected one of single, multi"]),
    "input_size a string": ("model: {input_size: big}\nimages:\n  - {path: ok.png}\n", ["model.input_size", "expected a positive integer"]),
    "unknown key": ("images:\n  - {path: ok.png, captoin: typo}\n", ["images[0] (id 'ok')", "unknown key 'captoin'"]),
    "duplicate ids": ("images:\n  - {path: ok.png, id: x}\n  - {path: ok.png, id: x}\n", ["images[1] (id 'x')", "duplicate id 'x'", "images[0]"]),
    "empty image list": ("images: []\n", ["images", "the list is empty"]),
    "no images key": ("title: nothing\n", ["images", "missing"]),
    "box inverted": (
        "images:\n  - {path: ok.png, objects: [{label: cat, box: [30, 5, 10, 25]}]}\n",
        ["images[0] (id 'ok')", "objects[0].box", "x1 (10) must be greater than x0 (30)"],
    ),
    "box empty": (
        "images:\n  - {path: ok.png, objects: [{label: cat, box: [10, 5, 30, 5]}]}\n",
        ["images[0] (id 'ok')", "objects[0].box", "zero height"],
    ),
    "box too short": ("images:\n  - {path: ok.png, objects: [{label: cat, box: [1, 2, 3]}]}\n", ["objects[0].box", "4 numbers"]),
    "missing image file": ("images:\n  - {path: nope.png}\n", ["images[0] (id 'nope')", "path", "image file not found: 'nope.png'"]),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_problem_exits_1_naming_file_entry_and_key(tmp_path, case):
    text, expected = MANIFEST_CASES[case]
    write_photo(tmp_path / "ok.png")
    if text is None:
        manifest = tmp_path / "missing.yaml"
    else:
        manifest = tmp_path / "manifest.yaml"
        # The tiny model (unless the case is about the model section): a wrongly accepted manifest fails fast.
        model = "" if text.startswith("model:") else (
            "model: {name: vit_tiny_patch16_224, pretrained: false, input_size: 32, "
            "options: {patch_size: 8, depth: 2, embed_dim: 24, num_heads: 3}}\n"
        )
        manifest.write_text(model + "detector: {name: none}\n" + text, encoding="utf-8")
    out = tmp_path / "out"
    result = _build(manifest, out)
    _clean_exit(result, 1)
    assert manifest.name in result.output
    for part in expected:
        assert part in result.output, (part, result.output)
    assert not out.exists(), "nothing is written for a bad manifest"
    assert not list(tmp_path.glob(".out.*")), "no staging folder left behind"


def test_box_outside_the_image_fails_only_that_image(tmp_path):
    write_photo(tmp_path / "small.png", (48, 40))
    write_photo(tmp_path / "fine.png", (48, 40), seed=1)
    manifest = write_manifest(
        tmp_path,
        [{"path": "small.png", "objects": [{"label": "far", "box": [10, 10, 100, 30]}]},
         {"path": "fine.png", "objects": [{"label": "near", "box": [10, 10, 40, 30]}]}],
    )
    out = tmp_path / "out"
    result = _build(manifest, out)
    _clean_exit(result, 3)
    assert "'small' failed" in result.output and "outside the 48x40 image" in result.output
    card = _error_card(out / "index.html", "small.png")
    assert "Not processed" in card and "objects[0]" in card and "outside the 48x40 image" in card
    assert (out / "fine.html").is_file() and not (out / "small.html").exists()
    assert broken_links(out) == []


# --------------------------------------------------------------------------------------------
# Image problems: the card says what went wrong, the others are complete, exit 2; --strict exit 1.
# --------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims ``width`` x ``height`` RGB pixels (a few bytes of data)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _bad_zero(path):
    path.write_bytes(b"")


def _bad_text(path):
    path.write_text("this is not an image\n")


def _bad_truncated_jpeg(path):
    write_photo(path.with_name("whole.jpg"), (64, 48), seed=7)
    data = path.with_name("whole.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_truncated_png(path):
    write_photo(path.with_name("whole.png"), (64, 48), seed=7)
    data = path.with_name("whole.png").read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_header_bomb(path):
    path.write_bytes(_png_claiming(100_000, 100_000))  # 10^10 pixels in 100 bytes


def _bad_eps(path):
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")


IMAGE_CASES = {
    "zero bytes": ("empty.png", _bad_zero, "the file is empty (0 bytes)"),
    "not an image": ("notes.jpg", _bad_text, "not an image Pillow can read"),
    "truncated JPEG": ("cut.jpg", _bad_truncated_jpeg, "image file is truncated"),
    "truncated PNG": ("cut.png", _bad_truncated_png, "could not decode the image"),
    "decompression bomb header": ("bomb.png", _bad_header_bomb, "decompression bomb: 10000000000 pixels"),
    "EPS (would run Ghostscript)": ("drawing.eps", _bad_eps, "PostScript/EPS images are not accepted"),
}


def _three_images(tmp_path, bad_name, make_bad):
    write_photo(tmp_path / "first.png", (48, 40), seed=1)
    make_bad(tmp_path / bad_name)
    write_photo(tmp_path / "last.jpg", (40, 48), seed=2)
    return write_manifest(tmp_path, [{"path": "first.png"}, {"path": bad_name, "id": "bad"}, {"path": "last.jpg"}])


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_bad_image_gets_a_card_others_complete(tmp_path, case):
    name, make_bad, message = IMAGE_CASES[case]
    manifest = _three_images(tmp_path, name, make_bad)
    out = tmp_path / "out"
    started = time.perf_counter()
    result = _build(manifest, out)
    assert time.perf_counter() - started < 30
    _clean_exit(result, 3)
    assert f"image 'bad' failed: {name}" in result.output and message in result.output
    card = _error_card(out / "index.html", name)
    assert "Not processed" in card and message in card
    for slug in ("first", "last"):
        assert (out / f"{slug}.html").is_file()
        assert (out / "figures" / slug / "maps.png").is_file()
    assert not (out / "bad.html").exists()
    results = json.loads((out / "results.json").read_text())
    assert [bool(i["error"]) for i in results["images"]] == [False, True, False]
    assert broken_links(out) == []


def test_modest_image_over_a_lowered_pixel_limit_is_refused(tmp_path, monkeypatch):
    # Pillow warns (rather than raises) between the limit and twice the limit: still refused.
    write_photo(tmp_path / "first.png", (30, 30), seed=1)
    write_photo(tmp_path / "big.png", (48, 40), seed=2)
    manifest = write_manifest(tmp_path, [{"path": "first.png"}, {"path": "big.png"}])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    out = tmp_path / "out"
    result = _build(manifest, out)
    _clean_exit(result, 3)
    card = _error_card(out / "index.html", "big.png")
    assert "decompression bomb: 1920 pixels, more than Pillow&#39;s limit of 1000" in card
    assert (out / "first.html").is_file()


def test_image_errors_do_not_publish_local_paths(tmp_path):
    manifest = _three_images(tmp_path, "notes.jpg", _bad_text)
    out = tmp_path / "out"
    _clean_exit(_build(manifest, out), 3)
    for page in [*out.glob("*.html"), out / "results.json"]:
        assert str(tmp_path) not in page.read_text(encoding="utf-8"), page.name


def test_strict_stops_at_the_first_bad_image_and_keeps_the_previous_site(tmp_path):
    write_photo(tmp_path / "first.png", (48, 40), seed=1)
    write_photo(tmp_path / "last.png", (48, 40), seed=2)
    manifest = write_manifest(tmp_path, [{"path": "first.png"}, {"path": "last.png"}])
    out = tmp_path / "out"
    _clean_exit(_build(manifest, out), 0)
    before = _snapshot(out)
    _bad_zero(tmp_path / "zero.png")
    _bad_text(tmp_path / "text.png")
    manifest = write_manifest(tmp_path, [{"path": "first.png"}, {"path": "zero.png"}, {"path": "text.png"}, {"path": "last.png"}])
    result = _build(manifest, out, "--strict")
    _clean_exit(result, 1)
    assert "images[1] (id 'zero')" in result.output and "empty" in result.output
    assert "text.png" not in result.output  # stopped at the first
    assert _snapshot(out) == before
    assert not list(tmp_path.glob(".out.*"))


def test_every_image_failing_still_writes_the_cards(tmp_path):
    _bad_zero(tmp_path / "zero.png")
    _bad_text(tmp_path / "text.png")
    manifest = write_manifest(tmp_path, [{"path": "zero.png"}, {"path": "text.png"}])
    out = tmp_path / "out"
    result = _build(manifest, out)
    _clean_exit(result, 3)
    assert "empty" in _error_card(out / "index.html", "zero.png")
    assert "not an image" in _error_card(out / "index.html", "text.png")
    assert broken_links(out) == []


def test_object_label_with_dollar_signs_does_not_break_the_build(tmp_path):
    write_photo(tmp_path / "a.png", (48, 40))
    manifest = write_manifest(
        tmp_path,
        [{"path": "a.png", "kind": "multi",
          "objects": [{"label": r"$\foo{$", "box": [0, 0, 20, 20]}, {"label": "costs $5 or $6", "box": [5, 5, 40, 30]}]}],
    )
    out = tmp_path / "out"
    result = _build(manifest, out)
    _clean_exit(result, 0)
    page = (out / "a.html").read_text(encoding="utf-8")
    assert "costs $5 or $6" in page and "$\\foo{$" in page


# --------------------------------------------------------------------------------------------
# Images that must work.
# --------------------------------------------------------------------------------------------


def _noise(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _quadrants(w, h):
    """Solid red / green / blue / white quadrants: survive JPEG and show orientation."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2 :] = (0, 255, 0)
    arr[h // 2 :, : w // 2] = (0, 0, 255)
    arr[h // 2 :, w // 2 :] = (255, 255, 255)
    return Image.fromarray(arr, "RGB")


def _save_tiny(path):
    _noise(5, 3).save(path)
    return (5, 3)


def _save_grey(path):
    _noise(60, 40).convert("L").save(path)
    return (60, 40)


def _save_rgba(path):
    im = _noise(60, 40).convert("RGBA")
    alpha = np.full((40, 60), 255, dtype=np.uint8)
    alpha[:, :10] = 0  # a fully transparent left edge
    alpha[:, 10:20] = 128
    im.putalpha(Image.fromarray(alpha, "L"))
    im.save(path)
    return (60, 40)


def _save_palette(path):
    _noise(60, 40).convert("P").save(path, transparency=0)
    return (60, 40)


def _save_cmyk(path):
    _quadrants(60, 40).convert("CMYK").save(path, quality=95)
    return (60, 40)


def _save_16bit(path):
    Image.fromarray((np.arange(60 * 40, dtype=np.uint16).reshape(40, 60) * 27)).save(path)
    assert Image.open(path).mode == "I;16"
    return (60, 40)


def _save_gif(path):
    red, blue = Image.new("RGB", (60, 40), (255, 0, 0)), Image.new("RGB", (60, 40), (0, 0, 255))
    red.save(path, save_all=True, append_images=[blue], duration=100, loop=0)
    return (60, 40)


def _save_exif_rotated(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape; shown after rotating 90 degrees clockwise
    _quadrants(60, 40).save(path, exif=exif.tobytes(), quality=95)
    return (40, 60)


def _save_one_bit(path):
    _noise(60, 40).convert("1").save(path)
    return (60, 40)


GOOD_IMAGES = {
    "smaller than a patch": ("tiny.png", _save_tiny),
    "greyscale": ("grey.png", _save_grey),
    "RGBA": ("rgba.png", _save_rgba),
    "palette with transparency": ("palette.png", _save_palette),
    "CMYK JPEG": ("cmyk.jpg", _save_cmyk),
    "16-bit PNG": ("deep.png", _save_16bit),
    "animated GIF": ("anim.gif", _save_gif),
    "EXIF-rotated JPEG": ("rotated.jpg", _save_exif_rotated),
    "1-bit": ("bits.png", _save_one_bit),
    "non-ASCII file name": ("Café 猫.png", _save_grey),
}


def _near(pixel, expected, tolerance=16):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


@pytest.mark.parametrize("case", list(GOOD_IMAGES))
def test_unusual_but_valid_images_work(tmp_path, case):
    name, save = GOOD_IMAGES[case]
    upright = save(tmp_path / name)
    manifest = write_manifest(tmp_path, [{"path": name, "kind": "multi",
                                          "objects": [{"label": "a", "box": [0, 0, 2, 2]}, {"label": "b", "box": [1, 1, 3, 3]}]}])
    out = tmp_path / "out"
    result = _build(manifest, out)
    _clean_exit(result, 0)
    record = json.loads((out / "results.json").read_text())["images"][0]
    assert record["error"] is None and record["size"] == list(upright)
    assert (out / record["page"]).is_file()
    original = Image.open(out / record["figures"]["original"])
    assert original.size == upright and original.mode == "RGB"
    assert broken_links(out) == []
    if case == "EXIF-rotated JPEG":
        # Rotated clockwise: the red top-left quadrant is now top-right, blue is top-left.
        px = original.load()
        assert px[30, 10][0] > 200 and px[30, 10][2] < 60, px[30, 10]
        assert px[10, 10][2] > 200 and px[10, 10][0] < 60, px[10, 10]
    # The original figure is a JPEG: colours are compared with a small tolerance.
    if case == "animated GIF":
        assert _near(original.getpixel((30, 20)), (255, 0, 0))  # the first frame
    if case == "RGBA":
        assert _near(original.getpixel((0, 0)), (255, 255, 255))  # transparent left edge on white
    if case == "16-bit PNG":
        low, high = original.getextrema()[0]
        assert low <= 8 and high >= 247  # scaled by its range, not clipped
    if case == "non-ASCII file name":
        assert record["id"] == "Café 猫" and record["page"] == "cafe-u732b.html"
        assert "Café 猫" in (out / "index.html").read_text(encoding="utf-8")


def _huge_jpeg(path, size=(6000, 4000)):
    g = Image.linear_gradient("L").resize(size)
    Image.merge("RGB", (g, g.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.new("L", size, 90))).save(path, quality=80)


def test_huge_image_is_downscaled_not_refused_and_stays_fast(tmp_path):
    from reportgen.imaging import MAX_SIDE

    _huge_jpeg(tmp_path / "huge.jpg")
    write_photo(tmp_path / "small.png")
    manifest = write_manifest(tmp_path, [{"path": "huge.jpg"}, {"path": "small.png"}])
    out = tmp_path / "out"
    started = time.perf_counter()
    result = _build(manifest, out)
    seconds = time.perf_counter() - started
    _clean_exit(result, 0)
    assert seconds < 20, f"a 6000x4000 image took {seconds:.1f} s"
    record = json.loads((out / "results.json").read_text())["images"][0]
    assert record["size"] == [6000, 4000]  # the original's size, which its boxes would be in
    from reportgen.imaging import open_image

    assert open_image(tmp_path / "huge.jpg").size == (MAX_SIDE, round(4000 * MAX_SIDE / 6000))  # what the model stage sees
    assert Image.open(out / record["figures"]["original"]).size == (768, 512)


def test_boxes_on_a_downscaled_huge_image_are_in_original_pixels(tmp_path):
    _huge_jpeg(tmp_path / "huge.jpg")
    write_photo(tmp_path / "small.png")
    manifest = write_manifest(
        tmp_path,
        [{"path": "huge.jpg", "kind": "multi",
          "objects": [{"label": "left", "box": [0, 0, 3000, 4000]}, {"label": "right", "box": [3000, 0, 6000, 4000]}]},
         {"path": "small.png"}],
    )
    out = tmp_path / "out"
    result = _build(manifest, out)
    _clean_exit(result, 0)
    record = json.loads((out / "results.json").read_text())["images"][0]
    # The two halves of the image each get half of the (uniform crop of the) model input.
    visible = [o["visible"] for o in record["objects"]["objects"]]
    assert len(visible) == 2 and all(v > 0 for v in visible)
    assert [o["box"] for o in record["objects"]["objects"]] == [[0, 0, 3000, 4000], [3000, 0, 6000, 4000]]


# --------------------------------------------------------------------------------------------
# Ids and paths: safe file names, nothing written outside the output folder.
# --------------------------------------------------------------------------------------------

_WRITES: list[tuple[str, str]] | None = None
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WRITE_EVENTS = {"os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "os.symlink", "os.link",
                 "os.truncate", "os.chmod", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}


def _audit(event, args):
    if _WRITES is None:
        return
    if event == "open":
        path, mode, flags = args
        if path is None or isinstance(path, int):
            return
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS):
            _WRITES.append((event, os.fsdecode(path)))
    elif event in _WRITE_EVENTS:
        for arg in args:
            if isinstance(arg, (str, bytes, os.PathLike)):
                _WRITES.append((event, os.fsdecode(arg)))


sys.addaudithook(_audit)

HOSTILE_IDS = [
    "../../x", "../../../escaped", "a/b", "a\\..\\..\\b", "/", ".", "..", "~", "*", "C:\\Windows\\x", "CON",
    "index", "index.html", "results", "results.json", "assets", "figures", ".reportgen-site", ".nojekyll",
    "a" * MAX_ID_LENGTH, "\u202eevil", "line\nbreak",
]


def test_hostile_ids_never_write_outside_the_output(tmp_path):
    global _WRITES
    inputs = tmp_path / "in"
    inputs.mkdir()
    absolute = tmp_path / "absolute-target"
    ids = [*HOSTILE_IDS, str(absolute), str(tmp_path / "in" / "0.png")]
    for i in range(len(ids)):
        write_photo(inputs / f"{i}.png", (24, 20), seed=i)
    # The last image comes from outside the manifest's folder, by a relative path with "..".
    write_photo(tmp_path / "outside.png", (24, 20), seed=99)
    images = [{"path": f"{i}.png", "id": image_id} for i, image_id in enumerate(ids)]
    images.append({"path": "../outside.png"})
    manifest = write_manifest(inputs, images)
    out = tmp_path / "out"
    before = _snapshot(tmp_path)
    existing_dirs = {*tmp_path.parents, tmp_path}

    _WRITES = []
    try:
        result = _build(manifest, out)
    finally:
        writes, _WRITES = _WRITES, None
    _clean_exit(result, 0)

    # Nothing outside "out" changed; nothing was left beside it.
    assert _snapshot(tmp_path, skip=(out,)) == before
    assert not absolute.exists()
    # Every write went into "out" or its staging folder beside it (".out.building-*", ".out.old-*"),
    # apart from matplotlib's own cache and mkdir(exist_ok=True) on folders that were already there.
    import matplotlib

    caches = [Path(matplotlib.get_cachedir()), Path(matplotlib.get_configdir())]

    def allowed(event: str, written: str) -> bool:
        path = Path(os.path.abspath(written))
        if path == out or out in path.parents:
            return True
        top = next((p for p in [path, *path.parents] if p.parent == tmp_path), None)
        if top is not None and top.name.startswith(".out."):
            return True
        if event == "os.mkdir" and path in existing_dirs:
            return True
        return any(path == c or c in path.parents for c in caches)

    assert len(writes) > len(images)  # the hook did see the build's writes
    assert [(e, p) for e, p in writes if not allowed(e, p)] == []

    # Pages are named by safe, distinct slugs; the site's own files are the site's own.
    results = json.loads((out / "results.json").read_text())
    pages = [i["page"] for i in results["images"]]
    assert len(set(pages)) == len(pages) == len(images)
    for page in pages:
        assert "/" not in page and "\\" not in page and not page.startswith(".") and ".." not in page
        assert page not in ("index.html", "results.json") and len(page) <= 90
        assert (out / page).is_file()
    assert [i["id"] for i in results["images"]][: len(ids)] == ids
    assert "images-heading" in (out / "index.html").read_text()
    assert (out / ".reportgen-site").read_text().startswith("This folder was written by reportgen")
    assert {p.name for p in (out / "figures").iterdir()} == {p[: -len(".html")] for p in pages}
    assert broken_links(out) == []


# --------------------------------------------------------------------------------------------
# User text renders as text.
# --------------------------------------------------------------------------------------------

PAYLOADS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "{{ config }}",
    "{% raw %}",
    "' onmouseover='x",
]
HTML_PAYLOADS = [p for p in PAYLOADS if any(c in p for c in "<>\"'")]


class _Elements:
    """Every element and attribute of a page, as a browser's tokenizer sees them."""

    def __init__(self, page: Path):
        from html.parser import HTMLParser

        self.tags: list[tuple[str, dict]] = []
        outer = self

        class Parser(HTMLParser):
            def handle_starttag(self, tag, attrs):
                outer.tags.append((tag, dict(attrs)))

        Parser().feed(page.read_text(encoding="utf-8"))


def test_hostile_text_in_title_caption_label_id_and_file_name_is_escaped(tmp_path):
    images = []
    for i, payload in enumerate(PAYLOADS):
        write_photo(tmp_path / f"{i}.png", (48, 40), seed=i)
        images.append({"path": f"{i}.png", "id": payload, "title": payload, "caption": payload, "kind": "multi",
                       "objects": [{"label": payload, "box": [0, 0, 20, 20]}, {"label": payload, "box": [10, 10, 40, 30]}]})
    # The id alone (the title defaults to it), and a failing image whose file name is a payload.
    write_photo(tmp_path / "id-only.png", (48, 40), seed=9)
    images.append({"path": "id-only.png", "id": PAYLOADS[1] + " (id only)"})
    broken = '"><img src=x onerror=alert(1)>.png'
    (tmp_path / broken).write_text("not an image")
    images.append({"path": broken, "id": PAYLOADS[0] + " broken"})
    manifest = write_manifest(tmp_path, images, title=PAYLOADS[4])
    out = tmp_path / "out"
    result = _build(manifest, out, "--title", PAYLOADS[0] + PAYLOADS[2])
    _clean_exit(result, 3)  # the broken image fails, on its card

    pages = sorted(out.glob("*.html"))
    assert len(pages) == len(PAYLOADS) + 2
    for page in pages:
        html = page.read_text(encoding="utf-8")
        for payload in HTML_PAYLOADS:
            assert payload not in html, (page.name, payload)
        # Template syntax is shown as typed, never evaluated.
        assert "{{ config }}" in html and "&lt;Config" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        elements = _Elements(page)
        # The site's own scripts come from assets/; nothing else may run or be embedded.
        scripts = [attrs for tag, attrs in elements.tags if tag == "script"]
        assert all((attrs.get("src") or "").startswith("assets/") for attrs in scripts), (page.name, scripts)
        assert not [tag for tag, _ in elements.tags if tag in ("iframe", "object", "embed", "base")], page.name
        assert not [(tag, a) for tag, attrs in elements.tags for a in attrs if a.startswith("on")], page.name
        assert not [attrs for tag, attrs in elements.tags if tag == "img" and attrs.get("src") == "x"], page.name
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;.png" in index  # the failed card's file name
    assert "{% raw %}" in index and "&#39; onmouseover=&#39;x" in index
    for payload in PAYLOADS:
        assert any(payload in (i["title"], i["id"]) for i in json.loads((out / "results.json").read_text())["images"])
    assert broken_links(out) == []


# --------------------------------------------------------------------------------------------
# The output folder: only ever replaced when empty or made by reportgen.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def one_image(tmp_path):
    write_photo(tmp_path / "cat.png", (48, 40))
    return write_manifest(tmp_path, [{"path": "cat.png"}])


def test_output_that_is_a_file_is_refused_with_exit_1(one_image, tmp_path):
    target = tmp_path / "report.html"
    target.write_text("my file")
    result = _build(one_image, target)
    _clean_exit(result, 1)
    assert "report.html" in result.output and "not a folder" in result.output
    assert target.read_text() == "my file"


def test_output_that_is_a_file_is_never_touched(one_image, tmp_path):
    target = tmp_path / "report.html"
    target.write_text("my file")
    result = _build(one_image, target)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "report.html" in result.output and ("is a file" in result.output or "not a folder" in result.output)
    assert target.read_text() == "my file"
    assert not list(tmp_path.glob(".report.html.*"))


def test_output_dir_in_the_manifest_that_is_a_file_is_a_manifest_error(tmp_path):
    write_photo(tmp_path / "cat.png", (48, 40))
    (tmp_path / "site").write_text("my file")
    manifest = write_manifest(tmp_path, [{"path": "cat.png"}], output={"dir": "site"})
    result = CliRunner().invoke(main, ["build", str(manifest), "--quiet"])
    _clean_exit(result, 1)
    assert "output.dir" in result.output and "is a file, not a folder" in result.output
    assert (tmp_path / "site").read_text() == "my file"


def test_output_that_is_the_images_folder_is_refused(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(photos / "cat.png", (48, 40))
    manifest = write_manifest(photos, [{"path": "cat.png"}])
    before = _snapshot(tmp_path)
    for out in (photos, tmp_path, Path(str(photos) + "/.")):
        result = _build(manifest, out)
        _clean_exit(result, 1)
        assert "not made by reportgen" in result.output and "refusing to replace it" in result.output
    assert _snapshot(tmp_path) == before


def test_site_folder_holding_the_inputs_is_not_replaced(tmp_path):
    # A reportgen site folder that the user then put the manifest and photos into.
    out = tmp_path / "site"
    write_photo(tmp_path / "cat.png", (48, 40))
    _clean_exit(_build(write_manifest(tmp_path, [{"path": "cat.png"}]), out), 0)
    write_photo(out / "my-photo.png", (48, 40), seed=5)
    manifest = write_manifest(out, [{"path": "my-photo.png"}])
    result = _build(manifest, out)
    assert (out / "my-photo.png").is_file() and manifest.is_file(), "the build deleted its own inputs"
    _clean_exit(result, 1)
