"""Models without a CLS token (global average pooling): the maps read the mean of the patch
queries' rows, checked against hand computations, and the site and results.json say so."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_MODEL, make_tiny_vit, write_manifest, write_photo

from reportgen.cli import main
from reportgen.config import AttentionSettings
from reportgen.methods import create_methods
from reportgen.model.loading import LoadedModel
from reportgen.model.runner import ModelRunner

GAP = {"class_token": False, "global_pool": "avg"}


def _loaded(model) -> LoadedModel:
    return LoadedModel(
        model=model, name="tiny-gap", architecture="vit", source="random", weights_file=None, weights_sha256=None,
        data_config={"input_size": (3, 32, 48)}, num_prefix_tokens=int(model.num_prefix_tokens), grid=(4, 6),
        patch_size=(8, 8), device=torch.device("cpu"), class_token=model.cls_token is not None,
    )


def _softmax_attention(model, x):
    """Each layer's attention probabilities ``[B, H, N, N]`` (float64), written out from the
    blocks' weights: softmax(Q Kᵀ / √d) on each block's input after its first norm."""
    layers = []
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for block in model.blocks:
            y = block.norm1(h).double()
            B, N, C = y.shape
            heads = block.attn.num_heads
            d = C // heads
            w, b = block.attn.qkv.weight.double(), block.attn.qkv.bias.double()
            q = (y @ w[:C].T + b[:C]).reshape(B, N, heads, d).permute(0, 2, 1, 3).numpy()
            k = (y @ w[C : 2 * C].T + b[C : 2 * C]).reshape(B, N, heads, d).permute(0, 2, 1, 3).numpy()
            scores = np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
            e = np.exp(scores - scores.max(axis=-1, keepdims=True))
            layers.append(e / e.sum(axis=-1, keepdims=True))
            h = block(h)
    return layers


def _rollout_by_hand(layers, start=1):
    """Abnar & Zuidema's rollout for image 0: per layer from ``start`` (1-based) on, heads
    averaged, 0.5·A + 0.5·I, rows renormalised, multiplied on the left."""
    n = layers[0].shape[-1]
    joint = np.eye(n)
    for a in layers[start - 1 :]:
        step = 0.5 * a[0].mean(axis=0) + 0.5 * np.eye(n)
        step = step / step.sum(axis=1, keepdims=True)
        joint = step @ joint
    return joint


@pytest.mark.parametrize("registers", [0, 2])
def test_gap_maps_are_the_mean_of_the_patch_queries_rows(registers):
    model = make_tiny_vit(depth=3, reg_tokens=registers, **GAP)
    assert model.num_prefix_tokens == registers and model.cls_token is None
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    layers = _softmax_attention(model, x)
    methods = create_methods(("attention", "rollout"), AttentionSettings())
    loaded = _loaded(model)
    forward = ModelRunner(loaded, methods).run(x)[0]
    attention, rolled = (m.maps(forward, loaded.layout) for m in methods)

    p = registers  # the rows of the patch queries start after the registers
    last = layers[-1][0]  # [H, N, N]
    mean_row = last[:, p:, :].mean(axis=1)[:, p:]  # per head: mean over patch queries, patch columns
    np.testing.assert_allclose(attention.extras["heads"].reshape(3, -1), mean_row, atol=1e-6)
    np.testing.assert_allclose(attention.maps["attention/mean"].ravel(), mean_row.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(attention.maps["attention/max"].ravel(), mean_row.max(axis=0), atol=1e-6)
    # The explorer's first layer, mean over heads.
    first = layers[0][0][:, p:, :].mean(axis=1)[:, p:].mean(axis=0)
    np.testing.assert_allclose(attention.layers[0, -1].ravel(), first, atol=1e-6)

    joint = _rollout_by_hand(layers)
    np.testing.assert_allclose(rolled.maps["rollout"].ravel(), joint[p:, p:].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(rolled.layers[0, 0].ravel(), _rollout_by_hand(layers[:1])[p:, p:].mean(axis=0), atol=1e-6)

    for text in (attention.provenance, rolled.provenance):
        assert "the mean of the patch queries" in text and "CLS" not in text


def test_a_model_with_a_cls_token_still_reads_row_zero():
    model = make_tiny_vit()
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    layers = _softmax_attention(model, x)
    methods = create_methods(("attention", "rollout"), AttentionSettings())
    loaded = _loaded(model)
    assert loaded.layout.query.key == "cls"
    forward = ModelRunner(loaded, methods).run(x)[0]
    attention, rolled = (m.maps(forward, loaded.layout) for m in methods)
    np.testing.assert_allclose(attention.maps["attention/mean"].ravel(), layers[-1][0][:, 0, 1:].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(rolled.maps["rollout"].ravel(), _rollout_by_hand(layers)[0, 1:], atol=1e-6)
    assert "the CLS token" in attention.provenance and "the CLS token" in rolled.provenance


def test_a_gap_site_states_its_query_on_the_pages_and_in_results_json(tmp_path):
    write_photo(tmp_path / "a.png")
    model = {**TINY_MODEL, "options": {**TINY_MODEL["options"], **GAP}}
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], model=model)
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["query"] == "mean of patch queries" and results["model"]["num_prefix_tokens"] == 0
    record = results["images"][0]
    assert record["attention"]["prefix_mass"] == 0 and record["attention"]["token_count"] == 16
    page = (out / record["page"]).read_text()
    assert "Attention of the mean of the patch queries, last layer" in page
    why = "the model pools the mean of its patch tokens rather than a CLS token"
    assert why in page and "CLS" not in page.replace(why, "")
    index = (out / "index.html").read_text()
    assert "the maps show the attention of the mean of the patch queries" in index
    assert "CLS" not in index.replace(why, "")
    # The build cache reads the query back (untrusted input) and reuses the image.
    again = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out)])
    assert again.exit_code == 0 and "1 unchanged" in again.output, again.output
    assert "warning" not in again.output


def test_a_cls_site_says_cls_in_results_json(tmp_path):
    write_photo(tmp_path / "a.png")
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(write_manifest(tmp_path, [{"path": "a.png"}])), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())["model"]["query"] == "cls"
    assert "the maps show the attention of the CLS token</dd>" in (out / "index.html").read_text()


def test_the_cache_refuses_an_unknown_query(tmp_path):
    from reportgen.cache.status import STATUS_FILE

    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}])
    out = tmp_path / "site"
    assert CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "-q"]).exit_code == 0
    status = json.loads((out / STATUS_FILE).read_text())
    status["model_run"]["model"]["query"] = "<script>"
    (out / STATUS_FILE).write_text(json.dumps(status))
    again = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out)])
    assert again.exit_code == 0 and "model_run.model.query" in again.output and "unchanged" not in again.output


@pytest.mark.parametrize("start", [1, 2, 3])
@pytest.mark.parametrize("options", [{}, GAP], ids=["cls", "gap"])
def test_rollout_start_layer_multiplies_layers_start_to_last(start, options):
    model = make_tiny_vit(depth=3, **options)
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(5))
    layers = _softmax_attention(model, x)
    (method,) = create_methods(("rollout",), AttentionSettings(rollout_start_layer=start))
    loaded = _loaded(model)
    rolled = method.maps(ModelRunner(loaded, [method]).run(x)[0], loaded.layout)
    p = model.num_prefix_tokens

    def query_row(joint):
        return joint[0, p:] if p else joint.mean(axis=0)

    np.testing.assert_allclose(rolled.maps["rollout"].ravel(), query_row(_rollout_by_hand(layers, start)), atol=1e-6)
    for layer in range(3):  # the explorer: the rollout through layers start..layer+1, the identity before
        through = _rollout_by_hand(layers[: layer + 1], start) if layer + 1 >= start else np.eye(layers[0].shape[-1])
        np.testing.assert_allclose(rolled.layers[layer, 0].ravel(), query_row(through), atol=1e-6)
    assert ("all layers" in rolled.provenance) == (start == 1)
    assert (f"layers {start} to 3" in rolled.provenance) == (start > 1)


@pytest.mark.parametrize(("global_pool", "query"), [("token", "cls"), ("avg", "mean of patch queries")])
def test_a_model_with_a_class_token_that_pools_its_patches_reads_their_mean(global_pool, query):
    from reportgen.config import ModelSettings
    from reportgen.model.loading import load_model

    options = {**TINY_MODEL["options"], "global_pool": global_pool}
    settings = ModelSettings(name=TINY_MODEL["name"], pretrained=False, input_size=TINY_MODEL["input_size"], options=options)
    loaded = load_model(settings, "cpu")
    assert loaded.num_prefix_tokens == 1 and loaded.layout.query.key == query
