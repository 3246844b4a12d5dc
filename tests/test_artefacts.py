"""Token norms, high-norm outliers and where each map's mass sits (peak, outliers, prefix kinds).

Expected values come from hand computations: the blocks walked by hand for the norms, numpy
medians for the outlier rule, sums over hand-built maps for the shares.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import TINY_MODEL, write_manifest
from PIL import Image

from reportgen import Explainer
from reportgen.cli import main
from reportgen.config import ImageEntry
from reportgen.experiments import explain
from reportgen.imaging import Geometry
from reportgen.methods.attention import AttentionMethod
from reportgen.methods.base import ForwardPass, TokenLayout
from reportgen.methods.maths import norm_outlier_threshold
from reportgen.methods.rollout import RolloutMethod
from reportgen.model.capture import attention_modules
from reportgen.model.norms import TokenNormCapture

TINY = dict(pretrained=False, input_size=TINY_MODEL["input_size"], options=TINY_MODEL["options"], device="cpu")
IMAGENET_MEAN = (124, 116, 104)  # a colour that normalises to about zero


def test_the_outlier_threshold_is_the_larger_of_the_robust_rule_and_twice_the_median():
    norms = np.array([
        [10.0, 11.0, 9.0, 10.5, 9.5, 10.0, 60.0],  # one artefact token at 6x the median
        [10.0, 10.1, 9.9, 10.0, 10.0, 10.0, 13.0],  # a narrow layer: 13 is many MADs up, but < 2x
    ])
    threshold = norm_outlier_threshold(norms)
    for layer, values in enumerate(norms):
        median = np.median(values)
        mad = np.median(np.abs(values - median))
        assert threshold[layer] == pytest.approx(max(median + 6 * 1.4826 * mad, 2 * median))
    assert (norms[0] > threshold[0]).tolist() == [False] * 6 + [True]
    assert not (norms[1] > threshold[1]).any()


def test_token_norms_are_those_of_each_block_input():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3, embed_dim=24, num_heads=3).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    names = tuple(name for name, _ in attention_modules(model))
    with TokenNormCapture(model, names) as capture, torch.inference_mode():
        model.forward_features(x)
        norms = capture.norms()
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        expected = []
        for block in model.blocks:
            expected.append(torch.sqrt((h * h).sum(-1)))
            h = block(h)
    torch.testing.assert_close(norms, torch.stack(expected, dim=1))
    assert all(not block._forward_pre_hooks for block in model.blocks)  # hooks removed


def _forward(patch_norms: np.ndarray, rows: np.ndarray, rolled: np.ndarray, prefix: int) -> ForwardPass:
    n = rows.shape[-1]
    norms = np.concatenate([np.full((patch_norms.shape[0], prefix), 1.0), patch_norms], axis=1)
    return ForwardPass(
        tokens=torch.zeros(n, 2),
        token_norms=torch.tensor(norms, dtype=torch.float32),
        query_rows=torch.tensor(rows, dtype=torch.float32),
        kept={"attention": {"token_attention": torch.full((n, n), 1 / n),
                            "patch_attention": torch.full((patch_norms.shape[0], n - prefix, n - prefix), 1 / (n - prefix))},
              "rollout": {"query_by_layer": torch.tensor(rolled, dtype=torch.float32)}},
    )


def test_a_map_peaking_on_a_planted_high_norm_token_is_flagged_with_its_shares():
    layout = TokenLayout(num_prefix_tokens=3, grid=(3, 3), patch_size=(2, 2), prefix_kinds=("cls", "register", "register"))
    patch_norms = np.tile(np.array([10.0, 10.5, 9.5, 10.2, 9.8, 10.1, 9.9, 10.0, 10.3]), (2, 1))
    patch_norms[1, 4] = 80.0  # planted in the last layer, centre patch
    rng = np.random.default_rng(0)
    rows = rng.random((2, 2, 12))  # [L, H, N]: CLS, 2 registers, 9 patches
    rows[:, :, 3 + 4] = 3.0  # every head peaks on the planted token
    rows /= rows.sum(-1, keepdims=True)
    rolled = rng.random((2, 12))
    rolled /= rolled.sum(-1, keepdims=True)
    entry = ImageEntry(index=0, id="a", slug="a", path=Path("a.png"), title="a", caption="", kind="single", objects=())
    view = Image.new("RGB", (6, 6))
    geometry = Geometry(source=(6, 6), resized=(6, 6), left=0, top=0, output=(6, 6))
    result = explain(entry, _forward(patch_norms, rows, rolled, 3), [AttentionMethod(), RolloutMethod()], layout, geometry, view, view, None)

    assert result.norms.outliers[1].sum() == 1 and result.norms.outliers[1][1, 1]
    assert not result.norms.outliers[0].any()
    c = result.concentration["attention/mean"]
    mean = rows[-1].mean(axis=0)
    patches = mean[3:]
    assert c.peak == (1, 1) and c.peak_is_outlier and c.note
    assert c.peak_share == pytest.approx(patches[4] / patches.sum(), rel=1e-6)
    assert c.outlier_share == pytest.approx(patches[4] / patches.sum(), rel=1e-6)
    assert c.prefix_share["cls"] == pytest.approx(mean[0] / mean.sum(), rel=1e-6)
    assert c.prefix_share["register"] == pytest.approx((mean[1] + mean[2]) / mean.sum(), rel=1e-6)
    r = result.concentration["rollout"]
    assert r.prefix_share["register"] == pytest.approx(rolled[-1, 1:3].sum() / rolled[-1].sum(), rel=1e-6)
    top = int(np.argmax(rolled[-1, 3:]))
    assert r.peak == divmod(top, 3) and r.peak_is_outlier == (top == 4)


def test_a_bright_patch_on_a_neutral_image_becomes_a_flagged_high_norm_token_on_a_real_model(tmp_path):
    # The neutral colour normalises to about zero, so every patch token but the bright one is
    # little more than the patch embedding's bias: the bright patch's norm is many times theirs.
    pixels = np.empty((32, 32, 3), dtype=np.uint8)
    pixels[:] = IMAGENET_MEAN
    pixels[8:16, 16:24] = 255  # patch (row 1, col 2) of the 4x4 grid
    Image.fromarray(pixels).save(tmp_path / "bright.png")
    result = Explainer(TINY_MODEL["name"], **TINY).explain(tmp_path / "bright.png").result
    assert result.norms.outliers[:, 1, 2].all()
    # Resizing spreads the bright square a little: only patches the model saw bright are flagged.
    bright = np.asarray(result.view).mean(axis=-1) > 160
    seen_bright = bright.reshape(4, 8, 4, 8).any(axis=(1, 3))
    assert not (result.norms.outliers & ~seen_bright).any()


def test_the_page_and_results_json_name_prefix_kinds_and_outliers(tmp_path):
    pixels = np.empty((32, 32, 3), dtype=np.uint8)
    pixels[:] = IMAGENET_MEAN
    pixels[8:16, 16:24] = 255
    Image.fromarray(pixels).save(tmp_path / "bright.png")
    model = {**TINY_MODEL, "options": {**TINY_MODEL["options"], "reg_tokens": 2}}
    manifest = write_manifest(tmp_path, [{"path": "bright.png"}], model=model)
    run = CliRunner().invoke(main, ["build", str(manifest), "-o", str(tmp_path / "site"), "--quiet"])
    assert run.exit_code == 0, run.output
    results = json.loads((tmp_path / "site" / "results.json").read_text())
    (image,) = results["images"]
    mean = image["concentration"]["attention/mean"]
    assert sorted(mean["prefix_share"]) == ["cls", "register"]
    grid = np.array(image["attention"]["cls_mean"])
    assert mean["peak_share"] == pytest.approx(grid.max() / grid.sum(), rel=1e-5)
    assert all([1, 2] in layer for layer in image["norms"]["outliers"])
    assert results["rules"] == {"outlier_sigmas": 6.0, "outlier_ratio": 2.0, "dominant_share": 0.1, "dominant_ratio": 10.0}
    page = (tmp_path / "site" / "bright.html").read_text()
    assert "On register tokens" in page and "On the CLS token" in page
    counts = [len(layer) for layer in image["norms"]["outliers"]]
    assert f"{counts[0]} in layer 1, {counts[1]} in layer 2." in page


def test_layers_where_one_patch_dominates_are_listed_per_method():
    layout = TokenLayout(num_prefix_tokens=1, grid=(6, 6), patch_size=(2, 2), prefix_kinds=("cls",))
    rows = np.full((2, 2, 37), 0.1)  # [L, H, N]: uniform rows ...
    rows[0, :, 1 + 35] = 3.0  # ... but in layer 1 every head puts 3.0 on the last patch
    rolled = np.full((2, 37), 0.1)
    rolled[1, 1 + 20] = 0.7  # the rollout's layer 2: 0.7 / 4.2 = 0.167, above 0.1 but below 10/36
    entry = ImageEntry(index=0, id="a", slug="a", path=Path("a.png"), title="a", caption="", kind="single", objects=())
    view = Image.new("RGB", (12, 12))
    geometry = Geometry(source=(12, 12), resized=(12, 12), left=0, top=0, output=(12, 12))
    forward = _forward(np.full((2, 36), 10.0), rows, rolled, 1)
    result = explain(entry, forward, [AttentionMethod(), RolloutMethod()], layout, geometry, view, view, None)
    # A patch dominates above max(0.1, 10 x 1/36): layer 1's head mean holds 3.0 / 6.5 on one patch.
    assert [layer for layer, _ in result.dominant_layers["attention"]] == [1]
    assert result.dominant_layers["attention"][0][1] == pytest.approx(3.0 / 6.5, rel=1e-6)
    assert result.dominant_layers["rollout"] == ()
