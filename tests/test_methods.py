"""Map methods as plug-ins: the registered methods against independent computations, what the
runner keeps for them, and a method added from outside the package (tests/plugin_example.py)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import hand_attention, hand_rollout, make_tiny_vit, map_tile, write_manifest, write_photo

from reportgen.cli import main
from reportgen.config import AttentionSettings
from reportgen.methods import METHODS, MethodSpec, create_methods
from reportgen.methods.base import SERVED, TokenLayout
from reportgen.model.loading import LoadedModel
from reportgen.model.runner import ModelRunner


def _loaded(model) -> LoadedModel:
    return LoadedModel(
        model=model, name="tiny", architecture="vit", source="random", weights_file=None, weights_sha256=None,
        data_config={"input_size": (3, 32, 48)}, num_prefix_tokens=1, grid=(4, 6), patch_size=(8, 8),
        device=torch.device("cpu"),
    )


LAYOUT = TokenLayout(num_prefix_tokens=1, grid=(4, 6), patch_size=(8, 8))


def test_every_registered_method_keeps_its_contract():
    model = make_tiny_vit()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    methods = create_methods(tuple(METHODS), AttentionSettings())
    forwards = ModelRunner(_loaded(model), methods).run(x)
    for method in methods:
        assert method.needs <= SERVED and method.spec is METHODS[method.spec.name]
        out = method.maps(forwards[0], LAYOUT)
        assert list(out.maps) == [name for name, _stem in method.spec.maps]
        assert all(name.startswith(method.spec.name) for name in out.maps)
        assert all(grid.shape == (4, 6) and grid.dtype == np.float64 for grid in out.maps.values())
        columns = 3 + 1 if method.spec.explorer == "heads+mean" else 1
        assert out.layers.shape == (2, columns, 4, 6)
        assert out.provenance


def test_attention_and_rollout_maps_equal_the_hand_computation():
    model = make_tiny_vit()
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    expected, _ = hand_attention(model, x)
    methods = create_methods(("attention", "rollout"), AttentionSettings())
    forward = ModelRunner(_loaded(model), methods).run(x)[0]
    attention, rolled = (m.maps(forward, LAYOUT) for m in methods)
    last_cls = expected[-1][0, :, 0, 1:].double().numpy()  # [H, patches]
    np.testing.assert_allclose(attention.maps["attention/mean"].ravel(), last_cls.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(attention.maps["attention/max"].ravel(), last_cls.max(axis=0), atol=1e-6)
    np.testing.assert_allclose(attention.extras["heads"].reshape(3, -1), last_cls, atol=1e-6)
    np.testing.assert_allclose(rolled.maps["rollout"].ravel(), hand_rollout(expected), atol=1e-6)
    np.testing.assert_allclose(rolled.layers[0, 0].ravel(), hand_rollout(expected[:1]), atol=1e-6)


def test_the_runner_keeps_only_what_the_methods_need():
    model = make_tiny_vit()
    x = torch.zeros(1, 3, 32, 48)
    (forward,) = ModelRunner(_loaded(model), create_methods(("rollout",), AttentionSettings())).run(x)
    assert forward.query_rows is None and list(forward.kept) == ["rollout"]
    (forward,) = ModelRunner(_loaded(model), create_methods(("attention",), AttentionSettings())).run(x)
    assert forward.query_rows.shape == (2, 3, 25) and list(forward.kept) == ["attention"]


@pytest.fixture
def first_method(monkeypatch):
    """Register tests/plugin_example.py as the method ``first``, as a plug-in would be."""
    spec = MethodSpec("first", "plugin_example", maps=(("first/mean", "first-mean"),), explorer="one")
    monkeypatch.setitem(METHODS, "first", spec)
    return spec


def test_a_method_added_as_a_module_and_a_registration_reaches_every_part_of_the_site(tmp_path, first_method):
    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], methods=["attention", "rollout", "first"])
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())["images"][0]
    entry = record["maps"]["first/mean"]
    assert entry["method"] == "first" and entry["provenance"].startswith("first-layer attention")
    grid = np.array(entry["grid"])
    assert grid.shape == (4, 4)  # TINY_MODEL: 32 px input, 8 px patches
    p = grid.ravel() / grid.sum()
    assert entry["entropy"]["nats"] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-5)
    assert map_tile(out, record["figures"], entry["figure"]).shape == (4 * 13, 4 * 13, 3)  # 13 sprite pixels a patch
    assert record["figures"]["explorer"]["first_column"] == 3 + 2  # after 3 heads, the mean, rollout
    page = (out / record["page"]).read_text()
    assert "first-layer attention of the CLS token" in page and 'value="c5"' in page
    # Unchanged, it is reused from the cache; with the method dropped, the cache no longer fits.
    again = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out)])
    assert again.exit_code == 0 and "1 unchanged" in again.output, again.output


def test_a_site_with_one_method_shows_its_maps(tmp_path):
    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png", "kind": "multi", "objects": [
        {"label": "left", "box": [0, 0, 20, 20]}, {"label": "right", "box": [20, 10, 48, 40]}]}], methods=["rollout"])
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())["images"][0]
    assert record["attention"] is None and record["rollout"] is None
    assert list(record["maps"]) == ["rollout"]
    assert record["objects"]["rollout_similarity"] is not None
    page = (out / record["page"]).read_text()
    assert "maps-heading" in page and "exp1-heading" not in page
    # The explorer without attention: one view, the rollout's, its caption as the script writes it.
    assert "<p>The rollout through each of the 2 layers." in page and "patch-view" not in page
    assert '<figcaption class="explorer-label" aria-live="polite">Layer 2 of 2: attention rollout through layers 1 to 2</figcaption>' in page
    assert sorted(p.name for p in (out / "figures" / record["slug"]).iterdir()) == [
        "explorer.png", "input.jpg", "maps.png", "objects.jpg", "original.jpg", "thumb.jpg"]


def test_a_site_with_only_a_method_no_section_shows_has_its_explorer(tmp_path):
    # Neither attention nor rollout: the explorer starts on the method's own column.
    from sitecheck import broken_links, disagreements

    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], methods=["relevance"])
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())["images"][0]
    explorer = record["figures"]["explorer"]
    assert explorer["relevance_column"] == 0 and explorer["mean_column"] is None and explorer["rollout_column"] is None
    page = (out / record["page"]).read_text()
    assert "Layer 2 of 2: relevance at this layer" in page and "All layers at once: relevance" in page
    assert "<p>Each method's map at each of the 2 layers." in page
    assert disagreements(out)[1] == [] and broken_links(out) == []
