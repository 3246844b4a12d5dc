"""The numbers the site publishes: their precision in results.json, undefined entropies, the
top-10% overlap of tied maps, the rollout's provenance and boxes on downscaled images.

Expected values are worked out by hand in the comments, never taken from the code under test.
"""

from __future__ import annotations

import itertools
import types
import json
import math
import re

import markupsafe
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from conftest import TINY_MODEL, write_manifest, write_photo
from sitecheck import disagreements

from reportgen import Explainer
from reportgen.cache import STATUS_FILE
from reportgen.cli import main
from reportgen.compute import _ObjectSource
from reportgen.config import ObjectBox
from reportgen.imaging import open_image
from reportgen.experiments import Entropy
from reportgen.methods import rollout as rollout_module
from reportgen.methods.maths import entropy, normalised_entropy, rollout_step, top_fraction_overlap, top_membership
from reportgen.methods.rollout import RolloutMethod
from reportgen.site.pages import results_json
from reportgen.site.records import plain

DASH = "\u2013"


def _through_results_json(value):
    return json.loads(results_json({"images": [{"value": plain(value)}]}))["images"][0]["value"]


def test_small_and_large_values_keep_a_relative_precision_of_1e_6():
    for value in (0.0021234567, 2.1234567e-9, 123456789.123, 98765.4321, -0.0031415926, np.float32(0.0021234567)):
        back = _through_results_json(value)
        assert abs(back - float(value)) <= 1e-6 * abs(float(value)), (value, back)


def test_rounding_is_to_seven_significant_digits_and_integers_stay_integers():
    # 0.0021234567 to 7 significant digits is 0.002123457; 123456789.123 is 123456800.
    assert _through_results_json(0.0021234567) == 0.002123457
    assert _through_results_json(123456789.123) == 123456800.0
    assert _through_results_json([1, np.int64(7), 0.5]) == [1, 7, 0.5]
    assert isinstance(_through_results_json(np.int64(7)), int)
    assert "0.002123457," in results_json({"images": [{"a": plain(0.0021234567), "b": 1}]})


# --------------------------------------------------------------------------------------------
# All-zero maps have no entropy.
# --------------------------------------------------------------------------------------------


def test_a_map_with_no_positive_weight_has_no_entropy():
    zero = torch.zeros(5, dtype=torch.float64)
    negative = torch.tensor([-1.0, 0.0, -0.5], dtype=torch.float64)
    assert math.isnan(entropy(zero).item()) and math.isnan(normalised_entropy(zero).item())
    assert math.isnan(entropy(negative).item()) and math.isnan(normalised_entropy(negative).item())
    # Row by row: (0, 0), then (1, 1) with H = ln 2 (normalised 1), then (0, 3) with H = 0.
    rows = normalised_entropy(torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 3.0]], dtype=torch.float64))
    assert math.isnan(rows[0].item()) and rows[1].item() == pytest.approx(1.0) and rows[2].item() == 0.0
    assert Entropy.of(np.zeros((4, 4))) == Entropy(nats=None, normalised=None)
    # One positive patch among zeros is a defined, one-hot distribution: entropy 0.
    one = np.zeros((4, 4))
    one[1, 2] = 0.3
    assert Entropy.of(one) == Entropy(nats=0.0, normalised=0.0)


@pytest.fixture
def zero_rollout(monkeypatch):
    """The rollout method made to give an all-zero map (as a degenerate model could)."""
    maps = rollout_module.RolloutMethod.maps

    def zero_maps(self, forward, layout):
        out = maps(self, forward, layout)
        out.maps["rollout"] = np.zeros_like(out.maps["rollout"])
        return out

    monkeypatch.setattr(rollout_module.RolloutMethod, "maps", zero_maps)


def _spans(page: str, path: str) -> list[str]:
    return re.findall(r'data-json="' + re.escape(path) + r'">([^<]*)<', page)


def test_an_all_zero_map_is_null_in_results_json_a_dash_on_the_pages_and_cached(tmp_path, zero_rollout):
    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}])
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())["images"][0]
    rolled = record["rollout"]
    assert rolled["rollout_entropy"] == {"nats": None, "normalised": None}
    assert rolled["entropy_change"] is None
    assert rolled["raw_entropy"]["normalised"] > 0  # the raw map is a real distribution
    page = (out / record["page"]).read_text()
    assert _spans(page, "images.0.rollout.rollout_entropy.normalised") == [DASH]
    assert _spans(page, "images.0.rollout.rollout_entropy.nats") == [DASH]
    index = (out / "index.html").read_text()
    assert _spans(index, "images.0.rollout.rollout_entropy.normalised") == [DASH, DASH]  # card, table
    assert _spans(index, "images.0.rollout.entropy_change") == [DASH]
    # The table cell has no sort key, so the sort script puts it last (it also knows the dash).
    cell = re.search(r'<td([^>]*)><span class="num" data-json="images\.0\.rollout\.entropy_change"', index)
    assert cell and "data-sort" not in cell.group(1)
    assert '"\\u2013"' in next((out / "assets").glob("report.*.js")).read_text()
    checked, problems = disagreements(out)
    assert checked and not problems, problems
    # The cache's schema accepts the nulls: an unchanged rebuild reuses the image.
    again = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out)])
    assert again.exit_code == 0 and "1 unchanged" in again.output and "recomputed" not in again.output, again.output
    # Half an entropy is refused as the cache's input: the image is recomputed, with a warning.
    status_file = out / STATUS_FILE
    status = json.loads(status_file.read_text())
    (entry,) = status["entries"].values()
    entry["record"]["rollout"]["rollout_entropy"]["nats"] = 1.0
    status_file.write_text(json.dumps(status))
    tampered = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out)])
    assert tampered.exit_code == 0 and "rollout_entropy" in tampered.output and "recomputed" in tampered.output
    assert json.loads((out / "results.json").read_text())["images"][0]["rollout"]["rollout_entropy"]["nats"] is None


def test_the_api_gives_none_for_an_all_zero_map(tmp_path, zero_rollout):
    tiny = dict(pretrained=False, input_size=TINY_MODEL["input_size"], options=TINY_MODEL["options"], device="cpu")
    result = Explainer(TINY_MODEL["name"], **tiny).explain(write_photo(tmp_path / "a.png"))
    assert result.entropy["rollout"].nats is None and result.entropy["rollout"].normalised is None
    assert result.entropy["attention/mean"].normalised is not None
    titles = [a.get_title() for a in result.figure().axes]
    assert any(title.startswith("rollout (entropy undefined)") for title in titles)


# --------------------------------------------------------------------------------------------
# Top-10% overlap with ties: the expected overlap under random tie-breaking.
# --------------------------------------------------------------------------------------------


def test_two_flat_maps_overlap_as_two_random_top_sets_would():
    # n = 20, k = ceil(0.1 * 20) = 2. Each patch is in a random top 2 with probability 2/20, so
    # the expected shared count is 20 * (1/10)^2 = 0.2, and the overlap 0.2 / 2 = 0.1 = k / n.
    flat = np.full((4, 5), 0.05)
    assert top_fraction_overlap(flat, flat, 0.1) == pytest.approx(0.1)
    # n = 196 (a 14x14 grid): k = 20, overlap k / n = 20 / 196.
    assert top_fraction_overlap(np.ones((14, 14)), np.full((14, 14), 3.0), 0.1) == pytest.approx(20 / 196)


def test_without_ties_at_the_kth_value_the_overlap_is_the_plain_share():
    x = np.arange(20.0)
    y = x.copy()
    y[19], y[0] = y[0], y[19]  # k = 2: {19, 18} against {0, 18}: one shared
    assert top_fraction_overlap(x, y, 0.1) == 0.5
    rng = np.random.default_rng(3)
    for _ in range(20):
        a, b = rng.random(50), rng.random(50)
        k = 5  # ceil(0.1 * 50)
        shared = len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k]))
        assert top_fraction_overlap(a, b, 0.1) == shared / k
    # Ties above the k-th value do not matter: (5, 5, 1, 0), k = 2, the top two are certain.
    assert top_fraction_overlap(np.array([5.0, 5.0, 1.0, 0.0]), np.array([0.0, 9.0, 8.0, 1.0]), 0.5) == 0.5


def test_tied_memberships_and_overlaps_by_hand():
    # a = (3, 1, 1, 1, 0), k = 2: patch 0 surely, one of the three 1s: membership 1/3 each.
    a = np.array([3.0, 1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(top_membership(a, 2), [1, 1 / 3, 1 / 3, 1 / 3, 0])
    # b = (0, 2, 2, 0, 0): its top 2 is {1, 2}. a's top 2 shares one patch with it when the tie
    # goes to 1 or 2 (probability 2/3): expected shared 2/3, overlap (2/3) / 2 = 1/3.
    b = np.array([0.0, 2.0, 2.0, 0.0, 0.0])
    assert top_fraction_overlap(a, b, 0.4) == pytest.approx(1 / 3)
    # a = (1, 1, 1, 1), k = 2: each patch 1/2. b = (2, 1, 1, 0): patch 0, then 1 or 2 (1/2 each).
    # Expected shared: 1/2 * 1 + 1/2 * 1/2 + 1/2 * 1/2 = 1; overlap 1/2.
    assert top_fraction_overlap(np.ones(4), np.array([2.0, 1.0, 1.0, 0.0]), 0.5) == pytest.approx(0.5)


def _top_sets(values, k):
    """Every top-k set a tie-breaking could choose (each equally likely), by enumeration."""
    order = sorted(set(values.tolist()), reverse=True)
    chosen, sets = [], [()]
    for value in order:
        group = [i for i, v in enumerate(values) if v == value]
        room = k - len(chosen)
        if room <= 0:
            break
        if len(group) <= room:
            chosen += group
            continue
        sets = [tuple(combo) for combo in itertools.combinations(group, room)]
        break
    return [set(chosen) | set(extra) for extra in sets]


def test_the_overlap_is_the_mean_over_every_tie_breaking():
    rng = np.random.default_rng(7)
    for _ in range(30):
        n = int(rng.integers(4, 12))
        a, b = rng.integers(0, 3, n).astype(float), rng.integers(0, 3, n).astype(float)
        fraction = float(rng.choice([0.1, 0.25, 0.5]))
        k = max(1, math.ceil(fraction * n))
        pairs = [(sa, sb) for sa in _top_sets(a, k) for sb in _top_sets(b, k)]
        expected = sum(len(sa & sb) for sa, sb in pairs) / len(pairs) / k
        assert top_fraction_overlap(a, b, fraction) == pytest.approx(expected, abs=1e-12), (a, b, k)


# --------------------------------------------------------------------------------------------
# The rollout's provenance says what the residual step computes for each head fusion.
# --------------------------------------------------------------------------------------------

# Two heads over two tokens. Mean: rows (0.5, 0.5), (0.5, 0.5), sum 1. Max: (0.8, 0.8) and
# (0.6, 0.6), sums 1.6 and 1.2. Min: (0.2, 0.2) and (0.4, 0.4), sums 0.4 and 0.8.
HEADS = torch.tensor([[[[0.8, 0.2], [0.4, 0.6]], [[0.2, 0.8], [0.6, 0.4]]]], dtype=torch.float64)


@pytest.mark.parametrize(
    "fusion, expected",
    [
        # (A + I) / (1 + s): mean, s = 1: ((1.5, 0.5), (0.5, 1.5)) / 2.
        ("mean", [[0.75, 0.25], [0.25, 0.75]]),
        # max: ((1.8, 0.8) / 2.6, (0.6, 1.6) / 2.2): the identity gets 1/2.6 and 1/2.2, under half.
        ("max", [[1.8 / 2.6, 0.8 / 2.6], [0.6 / 2.2, 1.6 / 2.2]]),
        # min: ((1.2, 0.2) / 1.4, (0.4, 1.4) / 1.8): the identity gets 1/1.4 and 1/1.8, over half.
        ("min", [[1.2 / 1.4, 0.2 / 1.4], [0.4 / 1.8, 1.4 / 1.8]]),
    ],
)
def test_the_residual_step_is_what_the_provenance_says(fusion, expected):
    np.testing.assert_allclose(rollout_step(None, HEADS, fusion)[0].numpy(), expected, rtol=1e-12)
    provenance = RolloutMethod(fusion).provenance("the CLS token", 12)
    assert f"heads fused by {fusion}," in provenance
    if fusion == "mean":
        assert "0.5·A + 0.5·I (the fused rows sum to 1: half attention, half identity)" in provenance
        return
    assert "0.5·A + 0.5·I" not in provenance and "(A + I)/(1 + s) per row, s being the fused row's sum" in provenance
    if fusion == "max":
        assert "≥ 1 for max: attention gets s/(1 + s) ≥ half of each row" in provenance
    else:
        assert "≤ 1 for min: the identity gets 1/(1 + s) ≥ half of each row" in provenance


def test_with_a_discard_the_provenance_never_claims_half_and_half():
    mean = RolloutMethod("mean", 0.25).provenance("the CLS token", 12)
    assert "lowest 0.25 of each layer discarded" in mean and "0.5·A" not in mean
    assert "≤ 1 after the discard: the identity gets 1/(1 + s) ≥ half" in mean
    peak = RolloutMethod("max", 0.25).provenance("the CLS token", 12)
    assert "0.5·A" not in peak and "≥ half" not in peak and "s above or below 1 after the discard" in peak
    assert "≤ 1 for min" in RolloutMethod("min", 0.25).provenance("the CLS token", 12)


def test_the_maps_carry_the_provenance(tmp_path):
    tiny = dict(pretrained=False, input_size=TINY_MODEL["input_size"], options=TINY_MODEL["options"], device="cpu")
    result = Explainer(TINY_MODEL["name"], head_fusion="min", **tiny).explain(write_photo(tmp_path / "a.png"))
    assert result.result.methods["rollout"].provenance == RolloutMethod("min").provenance("the CLS token", TINY_MODEL["options"]["depth"])


def test_the_page_and_results_json_give_the_provenance_of_the_fusion_used(tmp_path):
    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], attention={"head_fusion": "max"})
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())["images"][0]
    assert record["rollout"]["provenance"] == RolloutMethod("max").provenance("the CLS token", TINY_MODEL["options"]["depth"])
    page = (out / record["page"]).read_text()
    assert str(markupsafe.escape(RolloutMethod("max").provenance("the CLS token", TINY_MODEL["options"]["depth"]))) in page and "0.5·A" not in page


# --------------------------------------------------------------------------------------------
# Boxes on images downscaled on decoding are reported in the original image's pixels.
# --------------------------------------------------------------------------------------------


def _wide_png(path, size=(5000, 300)):
    """A PNG wider than the 4096 px working size: a horizontal gradient with a darker band."""
    w, h = size
    g = np.tile(np.linspace(0, 255, w, dtype=np.float64), (h, 1))
    g[100:200] *= 0.5
    Image.fromarray(np.stack([g, g[:, ::-1], np.full_like(g, 90)], axis=-1).astype(np.uint8)).save(path)
    return path


BOXES = [[1234, 17, 4321, 283], [0.5, 0, 2500.25, 150]]


def test_manifest_boxes_on_a_downscaled_image_round_trip_exactly(tmp_path):
    _wide_png(tmp_path / "wide.png")
    objects = [{"label": "long", "box": BOXES[0]}, {"label": "left", "box": BOXES[1]}]
    manifest = write_manifest(tmp_path, [{"path": "wide.png", "kind": "multi", "objects": objects}])
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())["images"][0]
    assert record["size"] == [5000, 300]  # the file's pixels, which the boxes are in
    assert [o["box"] for o in record["objects"]["objects"]] == BOXES
    page = (out / record["page"]).read_text()
    assert "<td>1234, 17, 4321, 283</td>" in page and "5000×300 px" in page
    # The model sees it through the decoded image: 5000x300 becomes 4096 x round(245.76) = 246;
    # the tiny model's centre crop (crop_pct 0.9) resizes the short side to floor(32 / 0.9) = 35,
    # the long one to int(35 * 4096 / 246) = 582, and keeps x from round((582 - 32) / 2) = 275.
    # So x in the file maps to x * 582 / 5000 - 275 in the input: box "long" covers the whole
    # width (1234 -> < 0, 4321 -> > 32) and box "left" ends at 2500.25 * 582 / 5000 - 275.
    (long, left) = record["objects"]["objects"]
    assert long["input_box"][0] == 0 and long["input_box"][2] == 32
    assert left["input_box"][2] == pytest.approx(2500.25 * 582 / 5000 - 275, rel=1e-6)


def test_detector_boxes_on_a_downscaled_image_are_scaled_back(tmp_path):
    image = open_image(_wide_png(tmp_path / "wide.png"))
    w, h = image.size
    assert w == 4096  # downscaled on decoding

    class Detector:
        def detect(self, seen):
            assert seen.size == (w, h)
            return [ObjectBox("all", 0.0, 0.0, float(w), float(h), 0.9), ObjectBox("right half", w / 2, 0.0, float(w), h / 2, 0.8)]

    source = _ObjectSource(types.SimpleNamespace(detector=types.SimpleNamespace(name="fake", threshold=0.5)), [])
    source._detector, source._tried = Detector(), True
    entry = types.SimpleNamespace(objects=())
    found = source(entry, image).boxes
    # The whole decoded image is the whole 5000x300 file; its right half starts at x = 2500.
    assert [b.as_tuple() for b in found] == [
        pytest.approx((0, 0, 5000, 300)), pytest.approx((2500, 0, 5000, 150))]
    assert [b.score for b in found] == [0.9, 0.8]


def test_float_arrays_are_rounded_to_significant_digits_as_single_values_are():
    from reportgen.site.records import plain

    rng = np.random.default_rng(3)
    # Every decade a float64 holds, float32 values as the model gives them, and edge cases.
    values = np.concatenate([
        rng.standard_normal(20000) * 10.0 ** rng.integers(-300, 300, 20000),
        rng.random(20000).astype(np.float32).astype(np.float64),
        [0.0, -0.0, 5e-324, 1e-310, 1.7e308, 0.5, 1.0, 123456749.99999999, 0.12345675, 2.5e-8],
        # Within a hair of a rounding tie in the 7th digit, where scaling could round the other way.
        np.nextafter(np.array([1.2345675, 0.0012345685, 98765.435, 3.1415925e-5] * 2),
                     np.repeat([-np.inf, np.inf], 4)),
    ])
    expected = [float(f"{v:.6e}") for v in values]  # 7 significant digits, by the decimal text
    assert plain(values) == expected
    assert json.dumps(plain(values)) == json.dumps(expected)  # the same text: -0.0 stays -0.0
    assert plain(values.reshape(2, -1)) == [expected[: len(values) // 2], expected[len(values) // 2 :]]
    assert plain(np.array([1.5, np.nan, -np.inf])) == [1.5, None, None]
    assert plain(np.array([3, 4])) == [3, 4] and isinstance(plain(np.array([3]))[0], int)
