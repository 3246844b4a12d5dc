"""The Python API: Explainer and reportgen.build, on the tiny random model (and the README's
example on the offline model)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, write_manifest, write_photo
from PIL import Image

import reportgen
from reportgen import Explainer
from reportgen.errors import ImageError

REPO = Path(__file__).resolve().parents[1]
TINY = dict(pretrained=False, input_size=TINY_MODEL["input_size"], options=TINY_MODEL["options"], device="cpu")


@pytest.fixture(scope="module")
def explainer():
    return Explainer(TINY_MODEL["name"], **TINY)


def test_explain_gives_every_map_over_the_patch_grid(explainer, tmp_path):
    result = explainer.explain(write_photo(tmp_path / "a.png"), boxes={"left": (0, 0, 20, 20), "right": (20, 10, 48, 40)})
    assert sorted(result.maps) == ["attention/max", "attention/mean", "rollout"]
    assert all(m.shape == (4, 4) and m.dtype == np.float32 for m in result.maps.values())
    p = result.maps["rollout"].astype(np.float64).ravel()
    p /= p.sum()
    assert result.entropy["rollout"].nats == pytest.approx(-(p * np.log(p)).sum(), abs=1e-5)
    assert result.objects.labels == ["left", "right"] and result.objects.plain_similarity.shape == (2, 2)
    figure = result.figure()
    assert len(figure.axes) == 4 and [a.get_title().split(" ")[0] for a in figure.axes[1:]] == list(result.maps)


def test_a_batch_gives_the_same_numbers_as_single_calls(explainer, tmp_path):
    paths = [write_photo(tmp_path / f"{i}.png", size=(48 + 8 * i, 40), seed=i) for i in range(3)]
    in_memory = Image.open(paths[2])
    batch = explainer.explain([paths[0], paths[1], in_memory])
    singles = [explainer.explain(paths[0]), explainer.explain(paths[1]), explainer.explain(Image.open(paths[2]))]
    for one, many in zip(singles, batch):
        for name in one.maps:
            np.testing.assert_allclose(one.maps[name], many.maps[name], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(batch[2].maps["rollout"], explainer.explain(paths[2]).maps["rollout"])


def test_methods_all_and_a_subset(tmp_path):
    photo = write_photo(tmp_path / "a.png")
    assert sorted(Explainer(TINY_MODEL["name"], methods="all", **TINY).explain(photo).maps) == [
        "attention/max", "attention/mean", "grad-rollout", "gradcam", "relevance", "rollout"]
    only = Explainer(TINY_MODEL["name"], methods=["rollout"], **TINY).explain(photo)
    assert list(only.maps) == ["rollout"] and only.result.attention is None


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"input_size": 100000}, "input_size"),
        ({"discard_ratio": 1.0}, "discard_ratio"),
        ({"head_fusion": "median"}, "head_fusion"),
        ({"methods": ["attention", "nope"]}, "nope"),
        ({"device": "meta"}, "device"),
        ({"batch_size": 0}, "batch"),
        ({"alpha": 0}, "alpha"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(settings, named):
    with pytest.raises(ValueError, match=named):
        Explainer(TINY_MODEL["name"], **{**TINY, **settings})


def test_an_unreadable_image_names_itself(explainer, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="broken.png"):
        explainer.explain(tmp_path / "broken.png")


def test_explain_leaves_global_state_alone(explainer, tmp_path):
    photo = write_photo(tmp_path / "a.png")
    rng = torch.get_rng_state()
    assert torch.is_grad_enabled()
    explainer.explain(photo)
    assert torch.is_grad_enabled() and torch.equal(torch.get_rng_state(), rng)


def test_build_from_python(tmp_path):
    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}])
    report = reportgen.build(manifest, output=tmp_path / "site")
    assert report.failed == [] and (tmp_path / "site" / "index.html").is_file()


@pytest.mark.offline_model
def test_the_readme_example_runs(monkeypatch):
    block = re.search(r"<!-- api-example -->\n```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README.md has no API example marked <!-- api-example -->"
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.maps["rollout"].shape == (16, 16)
    assert result.objects.labels == ["cat head"]


def test_the_sanity_check_leaves_the_kept_model_as_it_found_it(tmp_path):
    from reportgen.model.loading import load_model

    photo = write_photo(tmp_path / "a.png")
    explainer = Explainer(TINY_MODEL["name"], methods=["attention", "gradcam"], evaluate=True, random_orders=1,
                          sanity=True, **TINY)
    rng_before, grad_before = torch.get_rng_state(), torch.is_grad_enabled()
    result = explainer.explain(photo).result
    assert result.evaluation is not None and result.evaluation.sanity is not None  # the check ran
    (loaded,) = explainer._kept.values()
    fresh = load_model(explainer.settings.model, "cpu")  # the same seeded random weights
    for (name, kept), (_, original) in zip(loaded.model.state_dict().items(), fresh.model.state_dict().items()):
        assert torch.equal(kept, original), name
    fused = [(n, m.__dict__.get("fused_attn")) for n, m in loaded.model.named_modules() if hasattr(m, "qkv")]
    assert fused == [(n, m.__dict__.get("fused_attn")) for n, m in fresh.model.named_modules() if hasattr(m, "qkv")]
    assert fused
    assert all(p.grad is None and p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.training
    assert torch.equal(torch.get_rng_state(), rng_before) and torch.is_grad_enabled() == grad_before
