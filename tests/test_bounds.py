"""Issue 11: sizes and contents that must be bounded, each case through the real command line.

Text over its bound, too many objects, text that is not valid Unicode, files that are not regular
files, float images with NaN pixels and options that name weights files are refused with a message
naming the file, entry and key (or the option); no figure grows without bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL, source_env, write_manifest, write_photo
from PIL import Image
from test_bad_input import _build, _clean_exit  # the same CLI helpers as the other bad-input tests

from reportgen.config import (
    MAX_CAPTION_LENGTH,
    MAX_ID_LENGTH,
    MAX_LABEL_LENGTH,
    MAX_MANIFEST_BYTES,
    MAX_OBJECTS,
    MAX_TITLE_LENGTH,
    SettingsError,
    load_manifest,
)


def _subprocess_build(manifest, out, *args, timeout=60):
    """``reportgen build`` in a child process, killed after ``timeout`` seconds (a hang fails the test)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "reportgen.cli", "build", str(manifest), "-o", str(out), "--quiet", *args],
        env=source_env(), capture_output=True, text=True, timeout=timeout,
    )
    return done, time.perf_counter() - started


def _json_manifest(folder: Path, images: list, **sections) -> Path:
    """A manifest written as JSON (valid YAML) with ASCII escapes: it can hold lone surrogates."""
    data = {"model": TINY_MODEL, "detector": {"name": "none"}, **sections, "images": images}
    path = folder / "manifest.yaml"
    path.write_text(json.dumps(data, ensure_ascii=True), encoding="ascii")
    return path


def _box(i: int, label: str) -> dict:
    return {"label": label, "box": [i % 8 * 5, i // 8 * 4, i % 8 * 5 + 6, i // 8 * 4 + 5]}


# --------------------------------------------------------------------------------------------
# Text and object bounds: located manifest errors, exit 1, nothing written.
# --------------------------------------------------------------------------------------------

TOO_LONG = {
    "label": (
        {"path": "a.png", "id": "a", "kind": "multi", "objects": [_box(0, "x" * 5000), _box(1, "y" * 5000)]},
        ["images[0] (id 'a'): objects[0].label: too long: 5000 characters, more than the limit of 200",
         "images[0] (id 'a'): objects[1].label: too long"],
    ),
    "label one over": (
        {"path": "a.png", "id": "a", "objects": [_box(0, "x" * (MAX_LABEL_LENGTH + 1))]},
        [f"objects[0].label: too long: {MAX_LABEL_LENGTH + 1} characters"],
    ),
    "id": ({"path": "a.png", "id": "i" * (MAX_ID_LENGTH + 1)}, [f"images[0]: id: too long: {MAX_ID_LENGTH + 1} characters"]),
    "title": (
        {"path": "a.png", "id": "a", "title": "t" * (MAX_TITLE_LENGTH + 1)},
        [f"images[0] (id 'a'): title: too long: {MAX_TITLE_LENGTH + 1} characters, more than the limit of {MAX_TITLE_LENGTH}"],
    ),
    "caption": (
        {"path": "a.png", "id": "a", "caption": "c" * (MAX_CAPTION_LENGTH + 1)},
        [f"images[0] (id 'a'): caption: too long: {MAX_CAPTION_LENGTH + 1} characters"],
    ),
    "65 objects": (
        {"path": "a.png", "id": "a", "kind": "multi", "objects": [_box(i, f"o{i}") for i in range(MAX_OBJECTS + 1)]},
        ["images[0] (id 'a'): objects: 65 objects, more than the limit of 64 per image"],
    ),
}


@pytest.mark.parametrize("case", list(TOO_LONG))
def test_text_or_objects_over_a_bound_is_a_located_manifest_error(tmp_path, case):
    entry, expected = TOO_LONG[case]
    write_photo(tmp_path / "a.png", (48, 40))
    manifest = write_manifest(tmp_path, [entry])
    out = tmp_path / "out"
    started = time.perf_counter()
    result = _build(manifest, out)
    assert time.perf_counter() - started < 10
    _clean_exit(result, 1)
    assert str(manifest) in result.output
    for part in expected:
        assert part in result.output, (part, result.output)
    assert not out.exists()


def test_report_title_over_the_bound_is_a_manifest_error(tmp_path):
    write_photo(tmp_path / "a.png", (48, 40))
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], title="t" * (MAX_TITLE_LENGTH + 1))
    result = _build(manifest, tmp_path / "out")
    _clean_exit(result, 1)
    assert f"title: too long: {MAX_TITLE_LENGTH + 1} characters" in result.output


def test_text_at_the_bounds_and_64_objects_build_with_whole_tables(tmp_path):
    write_photo(tmp_path / "a.png", (48, 40))
    objects = [_box(i, (f"{i:02d} " + "label " * 40)[:MAX_LABEL_LENGTH]) for i in range(MAX_OBJECTS)]
    manifest = write_manifest(tmp_path, [{
        "path": "a.png", "id": "i" * MAX_ID_LENGTH, "title": "t" * MAX_TITLE_LENGTH,
        "caption": "c" * MAX_CAPTION_LENGTH, "kind": "multi", "objects": objects,
    }])
    out = tmp_path / "out"
    result = _build(manifest, out)
    _clean_exit(result, 0)
    record = json.loads((out / "results.json").read_text())["images"][0]
    assert len(record["objects"]["objects"]) == MAX_OBJECTS
    # The page keeps every label whole, and each similarity table has a coloured cell per pair.
    page = (out / record["page"]).read_text(encoding="utf-8")
    assert objects[5]["label"] in page
    assert page.count('<td class="heat') == 3 * MAX_OBJECTS**2


# --------------------------------------------------------------------------------------------
# Only regular files are read: FIFOs and devices are refused at once, never waited on.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


def test_fifo_as_the_manifest_is_refused_at_once(tmp_path, fifo):
    done, seconds = _subprocess_build(fifo, tmp_path / "out")
    assert done.returncode == 1, done.stderr
    assert str(fifo) in done.stderr and "is a FIFO (named pipe), not a manifest file" in done.stderr
    assert "Traceback" not in done.stderr and seconds < 30


def test_dev_zero_as_the_manifest_is_refused_at_once(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    done, seconds = _subprocess_build("/dev/zero", tmp_path / "out")
    assert done.returncode == 1, done.stderr
    assert "/dev/zero" in done.stderr and "is a device, not a manifest file" in done.stderr
    assert seconds < 30


def test_manifest_over_the_size_cap_is_refused(tmp_path):
    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}])
    with open(manifest, "a", encoding="utf-8") as fh:
        fh.write(("# padding\n" * 1024) * (MAX_MANIFEST_BYTES // 10240 + 1))
    result = _build(manifest, tmp_path / "out")
    _clean_exit(result, 1)
    assert "is larger than 10 MiB, the limit for a manifest" in result.output


def test_fifo_or_device_as_an_image_path_is_a_located_manifest_error(tmp_path, fifo):
    write_photo(tmp_path / "ok.png")
    images = [{"path": "ok.png"}, {"path": fifo.name}]
    if os.path.exists("/dev/zero"):
        images.append({"path": "/dev/zero", "id": "zero"})
    manifest = write_manifest(tmp_path, images)
    done, seconds = _subprocess_build(manifest, tmp_path / "out")
    assert done.returncode == 1, done.stderr
    assert seconds < 30
    assert "images[1] (id 'pipe'): path: 'pipe.png' (resolved to " in done.stderr
    assert "is not a file but a FIFO (named pipe)" in done.stderr
    if len(images) == 3:
        assert "images[2] (id 'zero'): path: '/dev/zero' (resolved to /dev/zero) is not a file but a device" in done.stderr


def test_image_and_hash_readers_refuse_a_fifo_without_waiting(fifo):
    # The manifest refuses a FIFO; a file replaced by one after the check (e.g. during --watch)
    # must still fail its image at once in the readers themselves.
    code = (
        "import sys\n"
        "from reportgen.errors import ImageError\n"
        "from reportgen.hashing import file_sha256\n"
        "from reportgen.imaging import open_image\n"
        "try:\n    open_image(sys.argv[1])\nexcept ImageError as err:\n    print('image:', err)\n"
        "try:\n    file_sha256(sys.argv[1])\nexcept OSError as err:\n    print('hash:', err.strerror)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(fifo)], env=source_env(), capture_output=True, text=True,
                          timeout=30)
    assert "image: pipe.png: not a regular file" in done.stdout, done.stderr
    assert "hash: not a regular file" in done.stdout, done.stderr


# --------------------------------------------------------------------------------------------
# Text that is not valid Unicode (lone surrogates) is refused in validation, naming the key.
# --------------------------------------------------------------------------------------------

SURROGATE = "\ud800"

SURROGATE_CASES = {
    "caption": ({"image": {"caption": f"a{SURROGATE}b"}}, "images[0] (id 'a'): caption: contains U+D800 at position 1"),
    "id": ({"image": {"id": f"x{SURROGATE}"}}, "images[0]: id: contains U+D800 at position 1"),
    "title": ({"image": {"title": SURROGATE}}, "images[0] (id 'a'): title: contains U+D800"),
    "label": ({"image": {"objects": [_box(0, SURROGATE)]}}, "images[0] (id 'a'): objects[0].label: contains U+D800"),
    "report title": ({"title": SURROGATE}, "title: contains U+D800"),
    "model name": ({"model": {**TINY_MODEL, "name": SURROGATE}}, "model.name: contains U+D800"),
    "model option": ({"model": {**TINY_MODEL, "options": {"global_pool": SURROGATE}}}, "model.options.global_pool: contains U+D800"),
    "detector name": ({"detector": {"name": SURROGATE}}, "detector.name: contains U+D800"),
    "cmap": ({"output": {"cmap": SURROGATE}}, "output.cmap: contains U+D800"),
    "output dir": ({"output": {"dir": SURROGATE}}, "output.dir: contains U+D800"),
    "weights path": ({"model": {**TINY_MODEL, "weights": SURROGATE}}, "model.weights: contains U+D800"),
}


@pytest.mark.parametrize("case", list(SURROGATE_CASES))
def test_lone_surrogates_are_refused_naming_the_key(tmp_path, case):
    changes, expected = SURROGATE_CASES[case]
    write_photo(tmp_path / "a.png", (48, 40))
    image = {"path": "a.png", "id": "a", **changes.get("image", {})}
    sections = {k: v for k, v in changes.items() if k != "image"}
    manifest = _json_manifest(tmp_path, [image], **sections)
    result = _build(manifest, tmp_path / "out")
    _clean_exit(result, 1)
    assert expected in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_non_utf8_image_file_name_is_a_located_manifest_error(tmp_path):
    if sys.platform != "linux":
        pytest.skip("file names are bytes only on Linux")
    write_photo(tmp_path / "a.png", (48, 40))
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 "café.png": the byte 0xe9 decodes to U+DCE9
    try:
        os.link(tmp_path / "a.png", os.path.join(os.fsencode(tmp_path), b"caf\xe9.png"))
    except OSError:
        pytest.skip("the file system refuses non-UTF-8 names")
    manifest = _json_manifest(tmp_path, [{"path": "a.png"}, {"path": name}])
    result = _build(manifest, tmp_path / "out")
    _clean_exit(result, 1)
    assert "images[1]: path: contains U+DCE9 at position 3" in result.output
    assert "file name that is not UTF-8" in result.output


# --------------------------------------------------------------------------------------------
# A float image with a NaN or infinite pixel fails that image (its card says why).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_float_tiff_with_a_non_finite_pixel_fails_that_image(tmp_path, bad):
    values = np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(40, 48)
    values[3, 7] = bad
    Image.fromarray(values, "F").save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    write_photo(tmp_path / "ok.png", (48, 40))
    manifest = write_manifest(tmp_path, [{"path": "ok.png"}, {"path": "float.tif", "id": "bad"}])
    out = tmp_path / "out"
    result = _build(manifest, out)
    _clean_exit(result, 3)
    message = "float.tif: 1 of its 1920 pixels are NaN or infinite"
    assert f"image 'bad' failed: {message}" in result.output
    assert message in (out / "index.html").read_text(encoding="utf-8")
    assert (out / "ok.html").is_file() and not (out / "bad.html").exists()


def test_float_tiff_with_finite_pixels_still_works(tmp_path):
    values = np.linspace(-3, 5, 48 * 40, dtype=np.float32).reshape(40, 48)
    Image.fromarray(values, "F").save(tmp_path / "float.tif")
    manifest = write_manifest(tmp_path, [{"path": "float.tif"}])
    _clean_exit(_build(manifest, tmp_path / "out"), 0)


# --------------------------------------------------------------------------------------------
# Options that name weights files are refused, pointing to model.weights / --weights.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, expected", [
    ("checkpoint_path", "other.pth", "names a weights file: weights from a file must be given with model.weights (or --weights)"),
    ("pretrained_cfg", "augreg_in21k", "a pretrained tag goes in model.name"),
    ("pretrained_cfg_overlay", "x", "can name a weights file, URL or hub repository"),
    ("cache_dir", "weights-folder", "names a folder weights are read from"),
])
def test_options_naming_weights_files_are_refused(tmp_path, option, value, expected):
    write_photo(tmp_path / "a.png")
    (tmp_path / "other.pth").write_bytes(b"not really weights")
    model = {**TINY_MODEL, "options": {**TINY_MODEL["options"], option: value}}
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], model=model)
    result = _build(manifest, tmp_path / "out")
    _clean_exit(result, 1)
    assert f"model.options.{option}: " in result.output and expected in result.output, result.output
    assert "model.weights (or --weights)" in result.output


# --------------------------------------------------------------------------------------------
# Command-line overrides go through the same rules as the manifest: usage errors, exit 2, at once.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["--input-size", "100000"], "Invalid value for '--input-size': 100000 is too large (at most 4096)"),
    (["--title", "t" * (MAX_TITLE_LENGTH + 1)], f"Invalid value for '--title': too long: {MAX_TITLE_LENGTH + 1} characters"),
    (["--cmap", SURROGATE], "Invalid value for '--cmap': contains U+D800"),
    (["--model", "m" * 300], "Invalid value for '--model': too long: 300 characters"),
    (["--detector", f"x{SURROGATE}"], "Invalid value for '--detector': contains U+D800"),
])
def test_overrides_share_the_manifest_rules(tmp_path, args, expected):
    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}])
    out = tmp_path / "out"
    started = time.perf_counter()
    result = _build(manifest, out, *args)
    assert time.perf_counter() - started < 10
    _clean_exit(result, 2)
    assert expected in result.output, result.output
    assert not out.exists()


def test_input_size_override_is_refused_in_a_subprocess_without_loading_a_model(tmp_path):
    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}])
    done, seconds = _subprocess_build(manifest, tmp_path / "out", "--input-size", "100000")
    assert done.returncode == 2, done.stderr
    assert "'--input-size': 100000 is too large (at most 4096)" in done.stderr
    assert seconds < 30 and not (tmp_path / "out").exists()


def test_with_overrides_applies_the_manifest_rules(tmp_path):
    write_photo(tmp_path / "a.png")
    manifest = load_manifest(write_manifest(tmp_path, [{"path": "a.png"}]))
    with pytest.raises(SettingsError) as info:
        manifest.with_overrides(model={"input_size": 100000, "options": {"checkpoint_path": "x.pth"}})
    assert info.value.problems == [
        ("input_size", "100000 is too large (at most 4096)"),
        ("options.checkpoint_path", "names a weights file: weights from a file must be given with model.weights (or --weights)"),
    ]
