"""The evaluation through the real program: settings (manifest and command line), the page's
figure and tables, results.json, the index's leaderboard, the build cache, and the boxes and
pointing game in model-input pixels."""

import json

import html5lib
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_manifest, write_photo
from sitecheck import broken_links, disagreements

from reportgen.cli import main
from reportgen.config import load_manifest
from reportgen.errors import ManifestError
from reportgen.imaging import plan_geometry

KINDS = ("deletion", "negative", "insertion")


def _build(manifest, out, *args):
    return CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet", *args])


@pytest.fixture
def photos(tmp_path):
    write_photo(tmp_path / "cat.png", (48, 40), seed=1)
    write_photo(tmp_path / "street.png", (64, 36), seed=2)
    return write_manifest(
        tmp_path,
        [
            {"path": "cat.png", "objects": [{"label": "head", "box": [10, 5, 30, 25]}]},
            {"path": "street.png", "kind": "multi",
             "objects": [{"label": "car", "box": [0, 0, 30, 30]}, {"label": "sign", "box": [40, 0, 64, 20]}]},
        ],
    )


def test_evaluate_builds_curves_tables_and_a_leaderboard_and_is_cached(photos, tmp_path):
    out = tmp_path / "site"
    result = _build(photos, out, "--evaluate", "--random-orders", "2", "--evaluate-baseline", "blur")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["evaluate"] == {"baseline": "blur", "random_orders": 2}
    maps = ["attention/max", "attention/mean", "rollout"]
    for record in results["images"]:
        e = record["evaluation"]
        assert (e["baseline"], e["steps"], e["random_orders"]) == ("blur", 10, 2)
        assert sorted(e["curves"]) == maps and sorted(e["auc"]) == maps
        assert e["fractions"][0] == 0.0 and e["fractions"][-1] == 1.0
        for name in maps:
            for kind in KINDS:
                curve = np.array(e["curves"][name][kind])
                # The area is the trapezoid rule over the fractions, recomputed here.
                x = np.array(e["fractions"])
                assert e["auc"][name][kind] == pytest.approx(float(np.sum((curve[1:] + curve[:-1]) / 2 * np.diff(x))), rel=1e-5)
                assert e["beats_random"][name][kind] == (
                    e["auc"][name][kind] < e["random"][kind]["auc_mean"] if kind == "deletion"
                    else e["auc"][name][kind] > e["random"][kind]["auc_mean"])
            assert e["curves"][name]["deletion"][0] == 1.0 and e["curves"][name]["insertion"][-1] == 1.0
        assert e["random"]["negative"]["aucs"] == e["random"]["deletion"]["aucs"]
        assert len(e["random"]["insertion"]["aucs"]) == 2
        # Every pair of maps, with the agreement recomputed from the grids.
        assert [(a["a"], a["b"]) for a in e["agreement"]] == [
            ("attention/mean", "attention/max"), ("attention/mean", "rollout"), ("attention/max", "rollout")]
        assert e["forwards"] == (3 * 3 + 2 * 2) * 9 + 3
        assert "class" in e["target"] and e["reference_score"] > 0
        assert (out / record["figures"]["evaluation"]).is_file()
    cat, street = results["images"]
    assert [b["label"] for b in cat["evaluation"]["localisation"]] == ["head"]
    assert [b["label"] for b in street["evaluation"]["localisation"]] == ["car", "sign"]
    board = results["leaderboard"]
    assert board["images"] == 2 and [m["name"] for m in board["maps"]] == ["attention/mean", "attention/max", "rollout"]
    mean = board["maps"][0]
    assert mean["auc"]["deletion"]["mean"] == pytest.approx(
        np.mean([r["evaluation"]["auc"]["attention/mean"]["deletion"] for r in results["images"]]), rel=1e-6)
    assert mean["pointing"]["boxes"] == 3
    assert mean["pointing"]["hits"] == sum(b["hit"]["attention/mean"] for r in results["images"] for b in r["evaluation"]["localisation"])
    assert board["published"]["rows"][1] == {"method": "rollout", "positive": 20.05, "negative": 53.1}
    # Every number on the pages is the number in results.json, and every link resolves.
    checked, problems = disagreements(out)
    assert problems == [] and checked > 100
    assert broken_links(out) == []
    parser = html5lib.HTMLParser(strict=True)
    for html in sorted(out.glob("*.html")):
        parser.parse(html.read_bytes())  # raises on any parse error
    page = (out / "cat.html").read_text()
    assert "Which map reflects what the model uses" in page and "the blurred image" in page
    index = (out / "index.html").read_text()
    assert "Published figures, for orientation" in index and "20.05" in index
    _check_leaderboard_figure(out, results)

    # A rebuild reuses every image, with the same pages; a record whose evaluation was changed is recomputed.
    pages = {name: (out / name).read_text() for name in ("index.html", "cat.html", "street.html")}
    again = _build(photos, out, "--evaluate", "--random-orders", "2", "--evaluate-baseline", "blur")
    assert again.exit_code == 0 and json.loads((out / "results.json").read_text()) == results
    assert {name: (out / name).read_text() for name in pages} == pages
    status = json.loads((out / ".reportgen-status.json").read_text())
    del status["entries"]["cat"]["record"]["evaluation"]["agreement"][0]
    (out / ".reportgen-status.json").write_text(json.dumps(status))
    tampered = CliRunner().invoke(main, ["build", str(photos), "-o", str(out), "--evaluate", "--random-orders", "2",
                                         "--evaluate-baseline", "blur"])
    assert tampered.exit_code == 0 and "'cat' does not fit this image (evaluation.agreement" in tampered.output
    assert json.loads((out / "results.json").read_text())["images"][0]["evaluation"]["agreement"] == cat["evaluation"]["agreement"]

    # Without --evaluate, nothing of it is left.
    plain = _build(photos, out)
    assert plain.exit_code == 0
    results = json.loads((out / "results.json").read_text())
    assert "leaderboard" not in results and "evaluate" not in results["settings"]
    assert all("evaluation" not in r and "evaluation" not in r["figures"] for r in results["images"])
    assert not (out / "figures" / "cat" / "evaluation.png").exists()
    assert not list((out / "assets").glob("leaderboard.*")) and "leaderboard" not in (out / "index.html").read_text()


def _check_leaderboard_figure(out, results):
    """The index's leaderboard figure: a PNG named by a hash of its data, alt text that names the
    best map of each curve against the random orders, and, drawn again from the records, a dot per
    map at its mean area with one standard deviation either side (numpy's, over the images) and the
    random orders' mean as a vertical line."""
    import re

    from PIL import Image

    from reportgen.site.figures import leaderboard_data, leaderboard_figure

    index = (out / "index.html").read_text()
    src, alt = re.search(r'<img src="(assets/leaderboard\.[0-9a-f]{10}\.png)" alt="([^"]*)"', index).groups()
    with Image.open(out / src) as png:
        assert png.format == "PNG" and png.width == 800
    evaluated = [r["evaluation"] for r in results["images"]]
    names = list(evaluated[0]["maps"])
    mean = {kind: {n: np.mean([e["auc"][n][kind] for e in evaluated]) for n in names} for kind in ("deletion", "insertion")}
    sd = {kind: {n: np.std([e["auc"][n][kind] for e in evaluated]) for n in names} for kind in ("deletion", "insertion")}
    random = {kind: np.mean([e["random"][kind]["auc_mean"] for e in evaluated]) for kind in ("deletion", "insertion")}
    best_d, best_i = min(names, key=mean["deletion"].get), max(names, key=mean["insertion"].get)
    assert f"Lowest deletion area: {best_d}, {mean['deletion'][best_d]:.3f} (" in alt
    assert f"highest insertion area: {best_i}, {mean['insertion'][best_i]:.3f} (" in alt
    below = "below" if mean["deletion"][best_d] < random["deletion"] else "not below"
    assert f"({below} the random orders' {random['deletion']:.3f})" in alt
    figure = leaderboard_figure(leaderboard_data(results["images"]))
    for ax, kind in zip(figure.axes, ("deletion", "insertion")):
        bars = {int(line.get_ydata()[0]): list(line.get_xdata()) for line in ax.lines
                if len(line.get_xdata()) == 2 and line.get_ydata()[0] == line.get_ydata()[1]}
        for row, name in enumerate(names):
            np.testing.assert_allclose(bars[row], [mean[kind][name] - sd[kind][name], mean[kind][name] + sd[kind][name]], rtol=1e-9)
        dots = next(line for line in ax.lines if len(line.get_xdata()) == len(names))
        np.testing.assert_allclose(dots.get_xdata(), [mean[kind][n] for n in names], rtol=1e-9)
        verticals = [line for line in ax.lines if list(line.get_ydata()) == [0, 1]]
        assert [line.get_xdata()[0] for line in verticals] == pytest.approx([random[kind]], rel=1e-9)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == names  # the panels share the rows


def test_boxes_and_the_pointing_game_are_in_model_input_pixels(tmp_path):
    write_photo(tmp_path / "wide.png", (64, 36), seed=4)
    manifest = write_manifest(tmp_path, [{"path": "wide.png", "objects": [{"label": "left", "box": [2, 2, 20, 34]}]}],
                              evaluate={"random_orders": 1})
    out = tmp_path / "site"
    assert _build(manifest, out).exit_code == 0
    results = json.loads((out / "results.json").read_text())
    (record,) = results["images"]
    (box,) = record["evaluation"]["localisation"]
    geometry = plan_geometry((64, 36), results["model"]["data_config"])
    # The input box as the crop maps it, worked out here from the geometry's scale and offset.
    sx, sy = geometry.resized[0] / 64, geometry.resized[1] / 36
    x0, y0, x1, y1 = 2 * sx - geometry.left, 2 * sy - geometry.top, 20 * sx - geometry.left, 34 * sy - geometry.top
    w, h = geometry.output
    assert box["input_box"] == pytest.approx([max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)], abs=1e-5)
    patch = results["model"]["patch_size"]
    weights = np.array(record["content"]["weights"])
    for name, grid in (("attention/mean", record["attention"]["cls_mean"]), ("rollout", record["rollout"]["rollout"])):
        values = np.where(weights > 0, np.array(grid), -np.inf)
        row, col = np.unravel_index(int(np.argmax(values)), values.shape)
        px, py = (col + 0.5) * patch[1], (row + 0.5) * patch[0]
        bx0, by0, bx1, by1 = box["input_box"]
        assert box["hit"][name] == (bx0 - 15 <= px <= bx1 + 15 and by0 - 15 <= py <= by1 + 15)
        coverage = np.zeros_like(weights)
        for r in range(weights.shape[0]):
            for c in range(weights.shape[1]):
                cw = max(0.0, min(bx1, (c + 1) * patch[1]) - max(bx0, c * patch[1]))
                ch = max(0.0, min(by1, (r + 1) * patch[0]) - max(by0, r * patch[0]))
                coverage[r, c] = cw * ch / (patch[0] * patch[1])
        assert box["mass"][name] == pytest.approx(float((np.array(grid) * coverage).sum() / (np.array(grid) * weights).sum()), rel=1e-5)


def test_evaluate_settings_in_the_manifest_and_on_the_command_line(tmp_path):
    write_photo(tmp_path / "a.png")
    on = load_manifest(write_manifest(tmp_path, [{"path": "a.png"}], evaluate=True))
    assert on.evaluate.enabled and on.evaluate.baseline == "mean" and on.evaluate.random_orders == 5
    section = load_manifest(write_manifest(tmp_path, [{"path": "a.png"}], evaluate={"baseline": "zero"}))
    assert section.evaluate.enabled and section.evaluate.baseline == "zero"
    off = load_manifest(write_manifest(tmp_path, [{"path": "a.png"}]))
    assert not off.evaluate.enabled
    with pytest.raises(ManifestError) as err:
        load_manifest(write_manifest(tmp_path, [{"path": "a.png"}], evaluate={"baseline": "grey", "random_orders": 0}))
    assert "evaluate.baseline: expected one of mean, blur, zero, got 'grey'" in str(err.value)
    assert "evaluate.random_orders: expected a positive integer, got 0" in str(err.value)
    with pytest.raises(ManifestError, match="evaluate: expected true, false or a mapping"):
        load_manifest(write_manifest(tmp_path, [{"path": "a.png"}], evaluate="yes"))
    manifest = write_manifest(tmp_path, [{"path": "a.png"}])
    bad = _build(manifest, tmp_path / "site", "--evaluate-baseline", "grey")
    assert bad.exit_code == 2 and "--evaluate-baseline" in bad.output and "grey" in bad.output
    bad = _build(manifest, tmp_path / "site", "--random-orders", "1000")
    assert bad.exit_code == 2 and "--random-orders" in bad.output


def test_the_api_evaluates_with_the_same_settings(tmp_path):
    from reportgen import Explainer

    write_photo(tmp_path / "a.png", (48, 40), seed=3)
    with pytest.raises(ValueError, match="evaluate.baseline: expected one of mean, blur, zero"):
        Explainer("vit_tiny_patch16_224", pretrained=False, evaluate=True, evaluate_baseline="grey")
    ex = Explainer("vit_tiny_patch16_224", pretrained=False, input_size=32, device="cpu",
                   options={"patch_size": 8, "depth": 2, "embed_dim": 24, "num_heads": 3}, evaluate=True, random_orders=1)
    e = ex.explain(tmp_path / "a.png", boxes={"thing": (4, 4, 30, 30)}).result.evaluation
    assert list(e.auc) == ["attention/mean", "attention/max", "rollout"] and e.baseline == "mean"
    assert [b.label for b in e.localisation] == ["thing"] and len(e.random["deletion"].aucs) == 1
    assert Explainer("vit_tiny_patch16_224", pretrained=False, input_size=32, device="cpu",
                     options={"patch_size": 8, "depth": 2, "embed_dim": 24, "num_heads": 3}).explain(
        tmp_path / "a.png").result.evaluation is None


def test_the_sanity_check_re_initialises_the_blocks_from_the_top_down(tmp_path):
    """Each step's maps against hand-written attention and rollout (softmax(QKᵀ/√d) from the
    randomised blocks' weights), their rank correlation with the original maps by scipy; the
    user's model is left as it was."""
    import torch
    from conftest import TINY_MODEL, hand_attention, hand_rollout
    from scipy.stats import spearmanr

    from reportgen.config import ModelSettings
    from reportgen.imaging import open_image, preprocess
    from reportgen.model.loading import load_model
    from reportgen.model.sanity import cascade

    write_photo(tmp_path / "a.png", (48, 40), seed=5)
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], evaluate={"random_orders": 1, "sanity": True})
    out = tmp_path / "site"
    result = _build(manifest, out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    (record,) = results["images"]
    sanity = record["evaluation"]["sanity"]
    assert sanity["blocks"] == [2, 1] and sanity["threshold"] == 0.5

    loaded = load_model(ModelSettings(**TINY_MODEL), "cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    x = preprocess(open_image(tmp_path / "a.png"), loaded.data_config)[0][None]
    weights = np.array(record["content"]["weights"])
    inside = weights > 0

    def values(grid):
        return (np.asarray(grid) * weights)[inside]

    attentions, _ = hand_attention(loaded.model, x)
    original = {"attention/mean": attentions[-1][0, :, 0, 1:].double().mean(0).numpy(), "rollout": hand_rollout(attentions)}
    with cascade(loaded.adapter) as steps:
        for step, index in enumerate(steps):
            assert index == sanity["blocks"][step] - 1
            attentions, _ = hand_attention(loaded.model, x)
            now = {"attention/mean": attentions[-1][0, :, 0, 1:].double().mean(0).numpy(), "rollout": hand_rollout(attentions)}
            for name in ("attention/mean", "rollout"):
                expected = spearmanr(values(original[name].reshape(weights.shape)), values(now[name].reshape(weights.shape)))[0]
                assert sanity["spearman"][name][step] == pytest.approx(expected, abs=1e-5)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())
    assert sanity["flagged"] == {name: sanity["spearman"][name][-1] > 0.5 for name in sanity["spearman"]}
    page = (out / "a.html").read_text()
    assert "Does each map depend on what the model learnt?" in page
    # The figure, and the flagged maps named (or none), in page order.
    assert record["figures"]["sanity"] == "figures/a/sanity.png" and (out / "figures/a/sanity.png").is_file()
    flagged = [name for name in record["evaluation"]["maps"] if sanity["flagged"][name]]
    expected = f"still above 0.5 with every block re-initialised: {', '.join(flagged)}." if flagged else "No map is flagged"
    assert expected in page
    board = results["leaderboard"]
    assert board["sanity_images"] == 1
    assert [m["sanity_flagged"] for m in board["maps"]] == [int(sanity["flagged"][m["name"]]) for m in board["maps"]]
    assert disagreements(out)[1] == []


def test_the_sanity_check_for_chosen_images_in_the_manifest_and_on_the_command_line(tmp_path):
    write_photo(tmp_path / "a.png", (48, 40), seed=6)
    write_photo(tmp_path / "b.png", (40, 48), seed=7)
    images = [{"path": "a.png"}, {"path": "b.png", "id": "bee"}]
    manifest = write_manifest(tmp_path, images, evaluate={"random_orders": 1, "sanity": ["bee"]})
    assert load_manifest(manifest).evaluate.sanity == ("bee",)
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["evaluate"]["sanity"] == ["bee"]
    a, b = results["images"]
    assert a["evaluation"]["sanity"] is None and b["evaluation"]["sanity"]["blocks"] == [2, 1]
    assert "Does each map depend" not in (out / "a.html").read_text() and "Does each map depend" in (out / "bee.html").read_text()
    assert results["leaderboard"]["sanity_images"] == 1

    # The command line chooses through the same settings; only the images whose choice changed are recomputed.
    plain = write_manifest(tmp_path, images, evaluate={"random_orders": 1})
    result = CliRunner().invoke(main, ["build", str(plain), "-o", str(out), "--sanity-image", "bee"])
    assert result.exit_code == 0 and "2 unchanged" in result.output, result.output
    result = CliRunner().invoke(main, ["build", str(plain), "-o", str(out), "--sanity-image", "a", "--sanity-image", "bee"])
    assert result.exit_code == 0 and "1 unchanged" in result.output, result.output
    assert all(r["evaluation"]["sanity"] is not None for r in json.loads((out / "results.json").read_text())["images"])
    assert disagreements(out)[1] == []

    # Unknown ids: the manifest's key and entry, the option on the command line.
    with pytest.raises(ManifestError) as err:
        load_manifest(write_manifest(tmp_path, images, evaluate={"sanity": ["bee", "cat"]}))
    assert "manifest.yaml" in str(err.value) and "evaluate.sanity[1]: no image has the id 'cat'" in str(err.value)
    assert "'a', 'bee'" in str(err.value)
    with pytest.raises(ManifestError, match="evaluate.sanity: expected true, false or a list of image ids, got 'yes'"):
        load_manifest(write_manifest(tmp_path, images, evaluate={"sanity": "yes"}))
    plain = write_manifest(tmp_path, images, evaluate={"random_orders": 1})
    bad = _build(plain, out, "--sanity-image", "cat")
    assert bad.exit_code == 2 and "--sanity-image" in bad.output and "no image has the id 'cat'" in bad.output
    both = _build(plain, out, "--sanity", "--sanity-image", "a")
    assert both.exit_code == 2 and "not both" in both.output


def test_a_failing_sanity_check_costs_the_checked_image_not_the_site(photos, tmp_path, monkeypatch):
    import contextlib

    import reportgen.model.sanity as sanity

    @contextlib.contextmanager
    def broken(adapter):
        raise RuntimeError("re-initialisation failed")
        yield

    monkeypatch.setattr(sanity, "cascade", broken)  # a bug in the check, injected; the model is real
    out = tmp_path / "site"
    result = _build(photos, out, "--evaluate", "--random-orders", "1", "--sanity-image", "street")
    assert "re-initialisation failed" in result.output
    records = {r["id"]: r for r in json.loads((out / "results.json").read_text())["images"]}
    assert "re-initialisation failed" in records["street"]["error"]
    assert records["cat"]["evaluation"]["sanity"] is None and records["cat"]["evaluation"]["auc"]


def test_the_sanity_check_explains_the_same_further_class_on_the_randomised_model(tmp_path):
    """A map for a further chosen class (``gradcam/target-2``) is re-made on every randomisation
    step for that class, not the randomised model's own prediction: each step's rank correlation
    equals one from a Grad-CAM written out in the test (hooked tokens, autograd gradients of that
    class's logit) on the original and on the randomised blocks."""
    from conftest import TINY_MODEL
    from scipy.stats import spearmanr
    from test_gradcam import gradcam_by_hand

    from reportgen.config import ModelSettings
    from reportgen.imaging import open_image, preprocess
    from reportgen.model.loading import load_model
    from reportgen.model.sanity import cascade

    write_photo(tmp_path / "a.png", (48, 40), seed=8)
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], methods=["gradcam"],
                              attention={"target_classes": [3, 7]}, evaluate={"random_orders": 1, "sanity": True})
    out = tmp_path / "site"
    result = _build(manifest, out)
    assert result.exit_code == 0, result.output
    (record,) = json.loads((out / "results.json").read_text())["images"]
    assert record["maps"]["gradcam/target-2"]["target"]["class_index"] == 7
    sanity = record["evaluation"]["sanity"]
    assert sanity["blocks"] == [2, 1]

    loaded = load_model(ModelSettings(**TINY_MODEL), "cpu")
    x = preprocess(open_image(tmp_path / "a.png"), loaded.data_config)[0][None]
    weights = np.array(record["content"]["weights"])
    inside = weights > 0

    def last_block_map(cls: int) -> np.ndarray:
        by_block = gradcam_by_hand(loaded.model, x, target=lambda m, f: m.forward_head(f)[:, cls])
        return (by_block[-1, 0].reshape(weights.shape) * weights)[inside]

    original = {"gradcam": last_block_map(3), "gradcam/target-2": last_block_map(7)}
    with cascade(loaded.adapter) as steps:
        for step, _index in enumerate(steps):
            for name, cls in (("gradcam", 3), ("gradcam/target-2", 7)):
                expected = spearmanr(original[name], last_block_map(cls))[0]
                assert sanity["spearman"][name][step] == pytest.approx(expected, abs=1e-5), (name, step)
