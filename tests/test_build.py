"""End to end: `reportgen build` on a tiny random model writes a complete, self-consistent site."""

import json

import pytest
from click.testing import CliRunner
from conftest import cosine, coverage_by_hand, hand_attention, hand_rollout, write_manifest, write_photo
from markupsafe import escape
from sitecheck import broken_links, disagreements, parse

from reportgen.cli import main


@pytest.fixture
def two_images(tmp_path):
    write_photo(tmp_path / "cat.png", (48, 40), seed=1)
    write_photo(tmp_path / "street scene.jpg", (64, 36), seed=2)
    return write_manifest(
        tmp_path,
        [
            {"path": "cat.png", "id": "cat", "title": "A cat", "kind": "single",
             "objects": [{"label": "head", "box": [10, 5, 30, 25]}]},
            {"path": "street scene.jpg", "title": "Street", "kind": "multi", "caption": "Two things",
             "objects": [{"label": "car", "box": [0, 0, 30, 30]}, {"label": "car", "box": [20, 4, 60, 34]},
                         {"label": "sign", "box": [40, 0, 64, 20]}]},
        ],
    )


def _build(manifest, out, *args):
    return CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet", *args])


def test_build_writes_a_complete_consistent_site(two_images, tmp_path):
    out = tmp_path / "site"
    result = _build(two_images, out)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.glob("*.html")} == {"index.html", "cat.html", "street-scene.html"}
    assert (out / ".nojekyll").is_file()
    results = json.loads((out / "results.json").read_text())
    assert [i["id"] for i in results["images"]] == ["cat", "street scene"]
    cat, street = results["images"]
    assert len(cat["attention"]["head_entropy"]) == 3
    assert cat["objects"] is None and street["objects"]["labels"] == ["car #1", "car #2", "sign"]
    assert results["model"]["grid"] == [4, 4] and results["model"]["num_prefix_tokens"] == 1
    assert results["capture"]["layers"] == ["blocks.0.attn", "blocks.1.attn"]
    # Figures exist for each panel, and every local link resolves with nothing external.
    for name in ("input.jpg", "maps.png", "explorer.png", "tokens.png", "objects.jpg"):
        assert (out / "figures" / "street-scene" / name).is_file(), name
    # The similarities are coloured tables on the page, not a figure.
    assert not (out / "figures" / "street-scene" / "similarity.png").exists()
    assert (out / "street-scene.html").read_text().count('<table class="similarity sortable"') == 3
    assert broken_links(out) == []
    # Every number on the pages is the number in results.json.
    checked, problems = disagreements(out)
    assert problems == [] and checked > 50
    # Every figure has alt text.
    for page in out.glob("*.html"):
        assert all(img.get("alt") for img in parse(page).images), page.name
    # The page says how attention was captured.
    assert "qkv projection" in (out / "index.html").read_text()


def test_results_agree_with_an_independent_computation(two_images, tmp_path):
    # The tiny model's attention, tokens and rollout recomputed here by hand (timm's own transform
    # for the input, hand_attention's softmax of q·k, numpy for the rest) against results.json.
    import math

    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    from reportgen.config import load_manifest
    from reportgen.model.loading import load_model

    out = tmp_path / "site"
    assert _build(two_images, out).exit_code == 0
    street = json.loads((out / "results.json").read_text())["images"][1]
    manifest = load_manifest(two_images)
    loaded = load_model(manifest.model, "cpu")  # the same seeded random weights the build used
    image = Image.open(manifest.images[1].path).convert("RGB")
    x = create_transform(**loaded.data_config, is_training=False)(image)[None]
    attentions, features = hand_attention(loaded.model, x)
    tokens = features[0, 1:].double().numpy()  # 16 patch tokens after the final norm

    # Experiments 1 and 2: the head-mean CLS map of the last layer, the rollout, their entropies.
    cls_mean = attentions[-1][0, :, 0, 1:].double().numpy().mean(axis=0)
    rollout = hand_rollout(attentions)
    assert np.ravel(street["attention"]["cls_mean"]) == pytest.approx(cls_mean, abs=2e-6)
    assert np.ravel(street["rollout"]["rollout"]) == pytest.approx(rollout, abs=2e-6)
    for shown, weights in ((street["attention"]["mean_entropy"], cls_mean), (street["rollout"]["rollout_entropy"], rollout)):
        p = weights / weights.sum()
        nats = float(-(p * np.log(p)).sum())
        assert shown["nats"] == pytest.approx(nats, abs=2e-6)
        assert shown["normalised"] == pytest.approx(nats / math.log(16), abs=2e-6)

    # Experiment 3. Geometry by hand: vit_tiny centre-crops with crop_pct 0.9, so the 64x36 photo is
    # resized to shorter side floor(32 / 0.9) = 35, i.e. 62x35, and its middle 32x32 kept (15 px cut
    # on the left, round(1.5) = 2 px at the top); boxes are clipped to the crop.
    assert loaded.data_config["crop_mode"] == "center" and loaded.data_config["crop_pct"] == 0.9
    plain, rolled = [], []
    for obj, shown in zip(manifest.images[1].objects, street["objects"]["objects"]):
        box = [min(max(v, 0.0), 32.0) for v in (obj.x0 * 62 / 64 - 15, obj.y0 * 35 / 36 - 2, obj.x1 * 62 / 64 - 15, obj.y1 * 35 / 36 - 2)]
        assert shown["input_box"] == pytest.approx(box, abs=1e-5)
        cover = coverage_by_hand(box, (4, 4), 8)
        plain.append(cover @ tokens / cover.sum())
        weights = cover * rollout
        rolled.append(weights @ tokens / weights.sum())
    assert len(plain) == len(street["objects"]["objects"]) == 3
    for i in range(3):
        for j in range(3):
            assert street["objects"]["plain_similarity"][i][j] == pytest.approx(cosine(plain[i], plain[j]), abs=2e-5)
            assert street["objects"]["rollout_similarity"][i][j] == pytest.approx(cosine(rolled[i], rolled[j]), abs=2e-5)
    # Guard: the objects really differ, so the check above compares more than ones.
    assert min(min(row) for row in street["objects"]["plain_similarity"]) < 0.99


def test_explorer_sprite_tiles_are_the_maps_in_results(two_images, tmp_path):
    # The last row of the sprite is the last layer: each head, the mean over heads, the rollout
    # and the token norms, each scaled to its maximum under the colour map (recomputed here with
    # matplotlib).
    import matplotlib
    import numpy as np
    from PIL import Image

    out = tmp_path / "site"
    assert _build(two_images, out).exit_code == 0
    results = json.loads((out / "results.json").read_text())
    street = results["images"][1]
    explorer = street["figures"]["explorer"]
    assert explorer == {"sprite": "figures/street-scene/explorer.png", "layers": 2, "heads": 3,
                        "columns": 6, "mean_column": 3, "rollout_column": 4, "norms_column": 5}
    sheet = np.asarray(Image.open(out / explorer["sprite"]).convert("RGB"))
    assert sheet.shape == (2 * 4, 6 * 4, 3)
    maps = [*street["attention"]["cls_heads"], street["attention"]["cls_mean"], street["rollout"]["rollout"],
            street["norms"]["patches"][-1]]
    cmap = matplotlib.colormaps[results["settings"]["cmap"]]
    for column, grid in enumerate(maps):
        grid = np.asarray(grid, dtype=np.float64)
        expected = np.round(cmap(np.round(grid / grid.max() * 255).astype(int))[..., :3] * 255)
        tile = sheet[4:8, 4 * column : 4 * column + 4]
        assert np.abs(tile.astype(int) - expected).max() <= 1, column


def test_rebuild_replaces_own_site_but_never_a_foreign_folder(two_images, tmp_path):
    out = tmp_path / "site"
    assert _build(two_images, out).exit_code == 0
    (out / "stale.html").write_text("old")
    assert _build(two_images, out).exit_code == 0
    assert not (out / "stale.html").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    result = _build(two_images, foreign)
    assert result.exit_code == 1
    assert "not made by reportgen" in result.output
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_bad_image_gets_a_card_and_nonzero_exit(two_images, tmp_path):
    (tmp_path / "cat.png").write_bytes(b"not a png")
    out = tmp_path / "site"
    result = _build(two_images, out)
    assert result.exit_code == 3
    assert "cat.png" in result.output
    index = (out / "index.html").read_text()
    assert "Not processed" in index and "cat.png" in index
    assert (out / "street-scene.html").is_file() and not (out / "cat.html").exists()
    assert broken_links(out) == []
    strict = _build(two_images, tmp_path / "strict", "--strict")
    assert strict.exit_code == 1 and "cat.png" in strict.output


def test_user_text_is_escaped(tmp_path):
    write_photo(tmp_path / "x.png")
    payload = "<script>alert('x')</script> \"quoted\" {{ 7*7 }}"
    manifest = write_manifest(
        tmp_path,
        [{"path": "x.png", "id": "x", "title": payload, "caption": payload, "kind": "multi",
          "objects": [{"label": payload, "box": [0, 0, 20, 20]}, {"label": "b", "box": [10, 10, 40, 30]}]}],
    )
    out = tmp_path / "site"
    assert _build(manifest, out, "--title", payload).exit_code == 0
    for page in ("index.html", "x.html"):
        html = (out / page).read_text()
        assert "<script>" not in html
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
        assert "{{ 7*7 }}" in html  # rendered as text, not evaluated
        assert "&#34;quoted&#34;" in html


def test_manifest_errors_exit_1_with_file_name(tmp_path):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text("images:\n  - path: nope.png\n    captoin: x\n")
    result = CliRunner().invoke(main, ["build", str(manifest), "--quiet"])
    assert result.exit_code == 1
    assert "bad.yaml" in result.output and "captoin" in result.output and "nope.png" in result.output
    assert "Traceback" not in result.output


def _scene_and_boxed(folder, detector):
    """Two multi images: one without boxes (left to the detector), one with manifest boxes."""
    write_photo(folder / "scene.png", (64, 48), seed=3)
    write_photo(folder / "boxed.png", (40, 40), seed=4)
    boxes = [{"label": "a", "box": [0, 0, 20, 20]}, {"label": "b", "box": [10, 10, 40, 40]}]
    return write_manifest(
        folder,
        [{"path": "scene.png", "kind": "multi"}, {"path": "boxed.png", "kind": "multi", "objects": boxes}],
        detector=detector,
    )


def test_detector_finds_objects_for_images_without_boxes(tmp_path):
    from test_detector import tiny_detr, tiny_processor

    folder = tmp_path / "detr"
    tiny_detr().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    manifest = _scene_and_boxed(tmp_path, {"name": str(folder), "threshold": 0.01})
    out = tmp_path / "site"
    result = _build(manifest, out)
    assert result.exit_code == 0, result.output
    scene, boxed = json.loads((out / "results.json").read_text())["images"]
    assert scene["objects"]["source"] == str(folder)
    detected = scene["objects"]["objects"]
    assert detected and all(o["score"] >= 0.01 and o["base_label"] in {"cat", "dog", "cup"} for o in detected)
    assert all(0 <= o["box"][0] < o["box"][2] <= 64 and 0 <= o["box"][1] < o["box"][3] <= 48 for o in detected)
    assert boxed["objects"]["source"] == "manifest"  # manifest boxes win over the detector
    assert broken_links(out) == []


def _cli_build(manifest, out, **env):
    """``python -m reportgen.cli build`` in a subprocess, as a user runs it."""
    import subprocess
    import sys

    from conftest import source_env

    return subprocess.run(
        [sys.executable, "-m", "reportgen.cli", "build", str(manifest), "-o", str(out)],
        env={**source_env(), **env}, capture_output=True, text=True, timeout=300,
    )


def test_unavailable_detector_is_said_on_the_page_and_in_the_run_metadata(tmp_path):
    # A reader of the site never sees the build's warning: the page of the image left without
    # objects, the index and results.json say the detector was not available, and why.
    hf_home = tmp_path / "hf-home"  # an empty Hugging Face cache, in offline mode
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")}
    manifest = _scene_and_boxed(tmp_path, {"name": "no-such-org/no-such-detr", "threshold": 0.5})
    out = tmp_path / "site"
    for build in ("first", "rebuild"):
        result = _cli_build(manifest, out, **env)
        assert result.returncode == 0, result.stderr  # the images themselves did not fail
        assert "warning: Could not load the object detector 'no-such-org/no-such-detr'" in result.stderr, build
        assert "Traceback" not in result.stderr
        results = json.loads((out / "results.json").read_text())
        reason = results["detector"]["reason"]
        assert results["detector"] == {"name": "no-such-org/no-such-detr", "threshold": 0.5, "status": "not available",
                                       "reason": reason, "images_without_objects": 1}, build
        assert "offline mode is on" in reason and "\n" not in reason and str(tmp_path) not in reason
        assert results["settings"]["detector"] == "no-such-org/no-such-detr"  # what was asked for
        scene, boxed = results["images"]
        assert scene["objects"]["objects"] == [] and scene["objects"]["detector_unavailable"] == reason
        assert boxed["objects"]["detector_unavailable"] is None and boxed["objects"]["labels"] == ["a", "b"]
        page = (out / "scene.html").read_text()
        assert "Objects from the detector" not in page
        assert "the detector no-such-org/no-such-detr was not available" in page
        assert str(escape(reason)) in page
        index = (out / "index.html").read_text()
        assert "The object detector no-such-org/no-such-detr was not available" in index and str(escape(reason)) in index
        assert "where the manifest gives no boxes" not in index
        for published in (page, index, (out / "results.json").read_text()):
            assert str(tmp_path) not in published
        assert broken_links(out) == []
        assert disagreements(out)[1] == []
    # The image without boxes was not cached as complete: the rebuild tried the detector again
    # (the warning above), and only the image with manifest boxes was reused.
    assert "1 unchanged" in result.stderr


def test_detector_that_loads_on_a_rebuild_gives_the_objects(tmp_path):
    from test_detector import tiny_detr, tiny_processor

    folder = tmp_path / "detr"  # given in the manifest, but not there yet
    manifest = _scene_and_boxed(tmp_path, {"name": str(folder), "threshold": 0.01})
    out = tmp_path / "site"
    result = _cli_build(manifest, out)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["detector"]["status"] == "not available"
    assert results["detector"]["reason"].startswith(f"could not be loaded (there is no folder {folder},")
    assert results["images"][0]["objects"]["objects"] == []

    tiny_detr().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    result = _cli_build(manifest, out)  # same settings: only the image left without objects is redone
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr and "1 unchanged" in result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["detector"] == {"name": str(folder), "threshold": 0.01, "status": "used", "reason": None,
                                   "images_without_objects": 0}
    scene = results["images"][0]["objects"]
    assert scene["objects"] and scene["detector_unavailable"] is None
    assert f"Objects from the detector {folder}" in (out / "scene.html").read_text()
    index = (out / "index.html").read_text()
    assert "was not available" not in index and "where the manifest gives no boxes" in index

    # Once complete, the image is cached like any other.
    result = _cli_build(manifest, out)
    assert result.returncode == 0 and "2 unchanged" in result.stderr, result.stderr
    assert json.loads((out / "results.json").read_text())["detector"]["status"] == "used"


def test_detector_not_needed_when_every_multi_image_has_boxes(tmp_path):
    write_photo(tmp_path / "boxed.png", (40, 40), seed=4)
    manifest = write_manifest(
        tmp_path, [{"path": "boxed.png", "kind": "multi", "objects": [{"label": "a", "box": [0, 0, 20, 20]}]}],
        detector={"name": "no-such-org/no-such-detr", "threshold": 0.5},
    )
    out = tmp_path / "site"
    result = _build(manifest, out)
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    assert json.loads((out / "results.json").read_text())["detector"]["status"] == "not needed"
    assert "the detector no-such-org/no-such-detr was not needed" in (out / "index.html").read_text()


def test_boxes_cropped_away_are_clipped_or_skipped(tmp_path):
    # vit_tiny's data config centre-crops (crop_pct 0.9): a 96x32 photo is resized to 106x35
    # (shorter side to floor(32/0.9) = 35) and its middle 32x32 kept, so the outer ~37 px of
    # each side (in original pixels) never reach the model.
    write_photo(tmp_path / "wide.png", (96, 32), seed=5)
    manifest = write_manifest(
        tmp_path,
        [{"path": "wide.png", "id": "wide", "kind": "multi",
          "objects": [{"label": "left edge", "box": [0, 0, 10, 32]},
                      {"label": "middle", "box": [40, 4, 56, 28]},
                      {"label": "straddling", "box": [20, 0, 60, 32]}]}],
    )
    out = tmp_path / "site"
    assert _build(manifest, out).exit_code == 0
    objects = json.loads((out / "results.json").read_text())["images"][0]["objects"]
    assert [o["label"] for o in objects["objects"]] == ["middle", "straddling"]
    assert objects["skipped"][0]["label"] == "left edge" and "outside" in objects["skipped"][0]["reason"]
    visible = {o["label"]: o["visible"] for o in objects["objects"]}
    assert visible["middle"] == 1.0 and 0 < visible["straddling"] < 1
    assert "left edge: skipped" in (out / "wide.html").read_text()


def test_figure_workers_write_the_same_site(two_images, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    one, two = tmp_path / "one", tmp_path / "two"
    assert _build(two_images, one).exit_code == 0
    result = _build(two_images, two, "--jobs", "2")
    assert result.exit_code == 0, result.output

    def files(site):
        return {p.relative_to(site): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}

    assert files(one) == files(two)


def test_results_json_is_json_with_one_image_per_line():
    from reportgen.site.pages import results_json

    results = {"format": 1, "title": "Kätzchen <b>", "images": [{"id": "a", "x": [1.5, None]}, {"id": "b"}], "pairs": []}
    text = results_json(results)
    assert json.loads(text) == results
    lines = text.splitlines()
    assert lines[lines.index('"images": [') + 1] == '{"id": "a", "x": [1.5, null]},'
    assert json.loads(results_json({**results, "images": []}))["images"] == []
