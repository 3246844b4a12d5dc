"""Letterbox padding: map statistics over the image only, padding shares per map, greyed overlays.

Every expected number is computed here by hand from hand-built maps on a model input whose top
and bottom are padding (one patch row half padding), not by the code under test.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from reportgen.config import ImageEntry, ObjectBox
from reportgen.experiments import explain
from reportgen.imaging import Geometry
from reportgen.methods.attention import AttentionMethod
from reportgen.methods.base import ForwardPass, TokenLayout
from reportgen.methods.rollout import RolloutMethod
from reportgen.site.figures import overlay, write_explorer_sprite

# A 16x6 image letterboxed into a 16x16 input: the image is y 5-11 (4 px patches, a 4x4 grid).
# Patch rows cover y 0-4, 4-8, 8-12, 12-16: image fractions 0, 0.75, 0.75, 0.
GEOMETRY = Geometry(source=(16, 6), resized=(16, 6), left=0, top=-5, output=(16, 16))
LAYOUT = TokenLayout(num_prefix_tokens=1, grid=(4, 4), patch_size=(4, 4))
CONTENT = np.array([[0.0] * 4, [0.75] * 4, [0.75] * 4, [0.0] * 4])
BOX = ObjectBox("thing", 0.0, 0.0, 8.0, 3.0)  # source pixels: input x 0-8, y 5-8 (patch row 1)


def _maps(seed: int = 0):
    rng = np.random.default_rng(seed)
    heads = rng.random((2, 17))  # CLS rows of one layer, two heads, 1 CLS + 16 patches
    heads[:, 1] = 5.0  # a hot spot on a padding patch (row 0)
    heads /= heads.sum(axis=1, keepdims=True)
    rolled = rng.random(17)
    rolled /= rolled.sum()
    return heads, rolled


#: The one layer's patch-to-patch attention (mean over heads) the attention method keeps: uniform.
PATCH_ATTENTION = torch.full((1, 16, 16), 1 / 16)


def _explain(heads: np.ndarray, rolled: np.ndarray):
    forward = ForwardPass(
        tokens=torch.zeros(17, 3),
        query_rows=torch.tensor(heads[None], dtype=torch.float32),
        kept={
            "attention": {"token_attention": torch.full((17, 17), 1 / 17), "patch_attention": PATCH_ATTENTION},
            "rollout": {"query_by_layer": torch.tensor(rolled[None], dtype=torch.float32)},
        },
    )
    entry = ImageEntry(index=0, id="a", slug="a", path=Path("a.png"), title="a", caption="", kind="single", objects=(BOX,))
    view = Image.new("RGB", (16, 16), (120, 120, 120))
    return explain(entry, forward, [AttentionMethod(), RolloutMethod()], LAYOUT, GEOMETRY, view, view, None)


def _entropy(grid: np.ndarray) -> tuple[float, float]:
    inside = CONTENT > 0
    q = (grid * CONTENT)[inside]
    q = q / q.sum()
    nats = float(-(q * np.log(q)).sum())
    return nats, nats / np.log(inside.sum())


def test_map_statistics_count_only_the_image_and_padding_is_reported_per_map():
    heads, rolled = _maps()
    result = _explain(heads, rolled)
    np.testing.assert_allclose(result.content.weights, CONTENT)
    assert result.content.fraction == pytest.approx(6 / 16)
    mean = heads[:, 1:].mean(axis=0).reshape(4, 4)
    roll = rolled[1:].reshape(4, 4)
    for name, grid in (("attention/mean", mean), ("attention/max", heads[:, 1:].max(axis=0).reshape(4, 4)), ("rollout", roll)):
        nats, normalised = _entropy(grid)
        assert result.entropy[name].nats == pytest.approx(nats, rel=1e-6)
        assert result.entropy[name].normalised == pytest.approx(normalised, rel=1e-6)
        assert result.padding_share[name] == pytest.approx((grid * (1 - CONTENT)).sum() / grid.sum(), rel=1e-6)
    # the hot spot on padding is most of the mean map's padding share
    assert result.padding_share["attention/mean"] > 0.2
    for h in range(2):
        assert result.attention.head_entropy[h].nats == pytest.approx(_entropy(heads[h, 1:].reshape(4, 4))[0], rel=1e-6)
    inside = CONTENT > 0
    a, b = (mean * CONTENT)[inside], (roll * CONTENT)[inside]
    assert result.rollout.spearman == pytest.approx(spearmanr(a, b).statistic, rel=1e-9)
    k = int(np.ceil(0.1 * a.size))  # 1 of the 8 patches with image
    assert result.rollout.top_overlap == pytest.approx(len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k)


def test_box_mass_and_box_share_have_one_denominator_the_image():
    heads, rolled = _maps(1)
    result = _explain(heads, rolled)
    mean = heads[:, 1:].mean(axis=0).reshape(4, 4)
    # The box covers input x 0-8, y 5-8: patch row 1 (y 4-8) three quarters, columns 0 and 1.
    coverage = np.zeros((4, 4))
    coverage[1, :2] = 0.75
    (box,) = result.attention.box_mass
    assert box.mass == pytest.approx((coverage * mean).sum() / (CONTENT * mean).sum(), rel=1e-6)
    assert box.area_share == pytest.approx((8 * 3) / (16 * 6))


def test_an_image_without_padding_keeps_every_patch_at_full_weight():
    geometry = Geometry(source=(16, 16), resized=(16, 16), left=0, top=0, output=(16, 16))
    heads, rolled = _maps(2)
    forward_result = _explain(heads, rolled)
    full = explain(
        forward_result.entry,
        ForwardPass(
            tokens=torch.zeros(17, 3),
            query_rows=torch.tensor(heads[None], dtype=torch.float32),
            kept={"attention": {"token_attention": torch.full((17, 17), 1 / 17), "patch_attention": PATCH_ATTENTION},
                  "rollout": {"query_by_layer": torch.tensor(rolled[None], dtype=torch.float32)}},
        ),
        [AttentionMethod(), RolloutMethod()], LAYOUT, geometry, forward_result.view, forward_result.view, None,
    )
    assert full.content.fraction == 1.0 and all(share == 0.0 for share in full.padding_share.values())
    p = rolled[1:] / rolled[1:].sum()
    assert full.entropy["rollout"].normalised == pytest.approx(-(p * np.log(p)).sum() / np.log(16), rel=1e-6)


def test_overlays_draw_padding_in_greys_and_leave_the_image_alone():
    view = Image.fromarray(np.random.default_rng(3).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    heat = np.arange(16, dtype=np.float64).reshape(4, 4)
    plain = np.asarray(overlay(view, heat, "inferno", 0.5))
    greyed = np.asarray(overlay(view, heat, "inferno", 0.5, GEOMETRY.content_box()))
    image_rows = list(range(5, 11))  # pixel centres 5.5 .. 10.5 lie in the image (y 5-11)
    padding_rows = [y for y in range(16) if y not in image_rows]
    np.testing.assert_array_equal(greyed[image_rows], plain[image_rows])
    for y in padding_rows:
        assert (greyed[y, :, 0] == greyed[y, :, 1]).all() and (greyed[y, :, 1] == greyed[y, :, 2]).all()
        assert not (plain[y, :, 0] == plain[y, :, 1]).all()  # the colour map did colour that row


def test_explorer_tiles_grey_only_patches_that_are_all_padding(tmp_path):
    layers = np.random.default_rng(4).random((2, 3, 4, 4))
    write_explorer_sprite(layers, "inferno", tmp_path / "plain.png")
    write_explorer_sprite(layers, "inferno", tmp_path / "greyed.png", padding=CONTENT == 0)
    plain = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))  # a palette image: no greys to hold
    greyed = np.asarray(Image.open(tmp_path / "greyed.png").convert("RGB"))
    padded = np.isin(np.arange(plain.shape[0]) % 4, [0, 3])  # rows 0 and 3 of every layer's tiles
    np.testing.assert_array_equal(greyed[~padded], plain[~padded])
    grey = greyed[padded]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_the_largest_patch_and_its_share_are_taken_over_the_image():
    heads, rolled = _maps(5)  # the hot spot is on patch (0, 0), all padding
    result = _explain(heads, rolled)
    mean = heads[:, 1:].mean(axis=0).reshape(4, 4)
    weighted = mean * CONTENT
    c = result.concentration["attention/mean"]
    assert c.peak == divmod(int(np.argmax(weighted)), 4) and c.peak[0] in (1, 2)
    assert c.peak_share == pytest.approx(weighted.max() / weighted.sum(), rel=1e-6)
