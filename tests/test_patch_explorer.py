"""The click-a-patch explorer's data: where each patch attends (mean over heads), per layer, against
a hand-written softmax(QK^T / sqrt(d)) from the tiny model's qkv weights, both as the runner keeps
it and as the sprite draws it."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import hand_attention, make_tiny_vit, write_manifest, write_photo

from reportgen.cli import main
from reportgen.config import AttentionSettings
from reportgen.methods import PATCH_LAYERS_GRID, create_methods
from reportgen.methods.base import TokenLayout
from reportgen.model.loading import LoadedModel
from reportgen.model.runner import ModelRunner


def _loaded(model, grid) -> LoadedModel:
    return LoadedModel(
        model=model, name="tiny", architecture="vit", source="random", weights_file=None, weights_sha256=None,
        data_config={"input_size": (3, grid[0] * 8, grid[1] * 8)}, num_prefix_tokens=1, grid=grid, patch_size=(8, 8),
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize("grid, kept", [((4, 6), 2), ((PATCH_LAYERS_GRID + 1, 3), 1)])
def test_runner_keeps_each_patch_row_mean_over_heads(grid, kept):
    """Every layer up to a 24 x 24 grid, beyond it the last layer only; rows over the patches
    (prefix dropped, not renormalised)."""
    model = make_tiny_vit(img_size=(grid[0] * 8, grid[1] * 8))
    x = torch.randn(2, 3, grid[0] * 8, grid[1] * 8, generator=torch.Generator().manual_seed(3))
    expected, _ = hand_attention(model, x)
    (method,) = create_methods(("attention",), AttentionSettings())
    forwards = ModelRunner(_loaded(model, grid), [method]).run(x)
    layout = TokenLayout(num_prefix_tokens=1, grid=grid, patch_size=(8, 8))
    patches = grid[0] * grid[1]
    for b, forward in enumerate(forwards):
        got = method.maps(forward, layout).extras["patch_attention"]
        assert got.shape == (kept, patches, patches)
        for i, layer in enumerate(expected[-kept:]):
            np.testing.assert_allclose(got[i], layer[b, :, 1:, 1:].double().numpy().mean(axis=0), atol=1e-6)


def _unit_values(tile: np.ndarray, cmap: str) -> np.ndarray:
    """Invert a colour map: each pixel's position on the map, in steps of 1/255."""
    import matplotlib

    lut = (matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round()
    distance = ((tile[..., None, :].astype(np.float64) - lut) ** 2).sum(axis=-1)
    return distance.argmin(axis=-1) / 255.0


def test_sprite_tile_is_the_patch_row_of_the_hand_computed_attention(tmp_path):
    from PIL import Image
    from timm.data import create_transform

    from reportgen.config import load_manifest
    from reportgen.model.loading import load_model

    write_photo(tmp_path / "square.png", (40, 40), seed=4)  # centre-cropped: no letterbox padding
    manifest = write_manifest(tmp_path, [{"path": "square.png", "id": "square"}])
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    patches = results["images"][0]["figures"]["patches"]
    assert patches == {"sprite": "figures/square/patches.png", "rows": 4, "cols": 4, "layers": 2, "first_layer": 1}
    sheet = np.asarray(Image.open(out / patches["sprite"]).convert("RGB"))
    assert sheet.shape == (2 * 4 * 4, 4 * 4, 3)  # per layer, a 4 x 4 block of 4 x 4 tiles

    settings = load_manifest(manifest)
    loaded = load_model(settings.model, "cpu")  # the same seeded random weights the build used
    image = Image.open(settings.images[0].path).convert("RGB")
    x = create_transform(**loaded.data_config, is_training=False)(image)[None]
    expected, _ = hand_attention(loaded.model, x)
    cmap = results["settings"]["cmap"]
    for layer in range(2):
        mean = expected[layer][0, :, 1:, 1:].double().numpy().mean(axis=0)  # [16 queries, 16 keys]
        for qr, qc in [(0, 0), (1, 2), (3, 3), (2, 0)]:
            row = mean[qr * 4 + qc].reshape(4, 4)
            tile = sheet[(layer * 4 + qr) * 4 : (layer * 4 + qr + 1) * 4, qc * 4 : (qc + 1) * 4]
            # Each tile from 0 to its own maximum: one step of the colour map of rounding.
            np.testing.assert_allclose(_unit_values(tile, cmap), row / row.max(), atol=1.5 / 255)
    # Guard: tiles of different queries differ, so the check above compares more than one map.
    assert not np.array_equal(sheet[0:4, 0:4], sheet[4:8, 8:12])


def test_comparison_grid_puts_maps_of_one_kind_in_one_column():
    from reportgen.methods import method_maps
    from reportgen.site.comparison import comparison_grid

    methods = ("attention", "rollout", "relevance", "gradcam")
    names = [m for name in methods for m, _ in method_maps(name, 3, 1)]
    grid = comparison_grid(methods, reversed(names))  # the order of the names does not matter
    assert [(c["kind"], c["number"], c["map"]) for c in grid["columns"]] == [
        ("main", 0, None), ("extra", 0, "attention/max"), ("target", 2, None), ("target", 3, None), ("object", 1, None),
    ]
    cells = {row["method"]: [c and (c["map"], c["figure"]) for c in row["cells"]] for row in grid["rows"]}
    assert cells == {
        "attention": [("attention/mean", "cls_mean"), ("attention/max", "cls_max"), None, None, None],
        "rollout": [("rollout", "rollout"), None, None, None, None],
        "relevance": [("relevance", "relevance"), None, ("relevance/target-2", "relevance_t2"),
                      ("relevance/target-3", "relevance_t3"), ("relevance/object-1", "relevance_o1")],
        "gradcam": [("gradcam", "gradcam"), None, ("gradcam/target-2", "gradcam_t2"),
                    ("gradcam/target-3", "gradcam_t3"), ("gradcam/object-1", "gradcam_o1")],
    }
    # A method with fewer maps than the others (an image with fewer objects) leaves its cells empty.
    grid = comparison_grid(("rollout", "gradcam"), ["rollout", "gradcam", "gradcam/object-1", "gradcam/object-2"])
    assert [row["cells"][1:] for row in grid["rows"]][0] == [None, None]


def test_beyond_a_24_by_24_grid_the_page_offers_the_last_layer_only(tmp_path):
    from PIL import Image

    write_photo(tmp_path / "big.png", (200, 200), seed=5)
    model = {"name": "vit_tiny_patch16_224", "pretrained": False, "input_size": 200,
             "options": {"patch_size": 8, "depth": 2, "embed_dim": 24, "num_heads": 3}}
    manifest = write_manifest(tmp_path, [{"path": "big.png", "id": "big"}], model=model)
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    patches = json.loads((out / "results.json").read_text())["images"][0]["figures"]["patches"]
    assert patches == {"sprite": "figures/big/patches.png", "rows": 25, "cols": 25, "layers": 1, "first_layer": 2}
    assert Image.open(out / patches["sprite"]).size == (25 * 25, 25 * 25)
    page = (out / "big.html").read_text()
    assert "in the last layer (layer 2) only: beyond a grid of 24 × 24 patches" in page
    assert 'data-layers="1" data-first-layer="2"' in page  # the script shows the patches at layer 2 only
