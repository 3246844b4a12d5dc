"""Chosen classes for the gradient methods (attention.target_classes, --target-classes,
Explainer(target_classes=)): one class, several, or each image's top k; the syntax checked by the
settings, the classes checked against the loaded model in one line, and each target's maps equal
to those of a direct computation for that class."""

import copy
import json

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import TINY_MODEL, map_tile, write_manifest, write_photo
from test_gradcam import gradcam_by_hand
from test_relevance import hand_attention_and_gradients, images, loaded, make_model, relevance_by_hand

from reportgen.cli import main
from reportgen.config import AttentionSettings, ClassTargets
from reportgen.experiments import maps_for_every_target
from reportgen.methods import create_methods
from reportgen.model.runner import ModelRunner
from reportgen.model.targets import Targets


def classes(value):
    return AttentionSettings(target_classes=value).target_classes


def test_the_setting_takes_indices_digits_names_lists_or_top_k_and_refuses_the_rest():
    assert classes("281") == ClassTargets((281,)) and classes(" 7 ") == ClassTargets((7,)) and classes(3) == ClassTargets((3,))
    assert classes(" tabby ") == ClassTargets(("tabby",))
    assert classes([5, "tabby", "12"]) == ClassTargets((5, "tabby", 12)) and classes([5, "tabby"]).count == 2
    assert classes("top-3") == ClassTargets(top=3) and classes(" top-3 ").count == 3 and classes("top-3").as_written() == "top-3"
    assert AttentionSettings().target_classes is None and AttentionSettings().target_count == 1
    for bad, shown in ((-1, "-1"), ("-3", "-3"), (True, "true"), ("", "''"), (2.5, "2.5")):
        with pytest.raises(ValueError, match=f"expected a class index .* got {shown}"):
            classes(bad)
    for bad, message in (([], "the list is empty"), ([1, "1"], r"target_classes.1\n  '1' is listed more than once"),
                         (list(range(11)), "11 classes; at most 10"), ("top-0", "top-k takes k from 1 to 10"),
                         ("top-11", "top-k takes k from 1 to 10"), ([1, -2], r"target_classes.1\n  expected a class index")):
        with pytest.raises(ValueError, match=message):
            classes(bad)


def test_names_resolve_to_imagenet_classes_by_full_name_or_synonym():
    targets = Targets(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1))
    info = timm.data.ImageNetInfo()
    assert targets.resolve("tabby") == 281 and targets.resolve("Tabby Cat") == 281
    assert targets.resolve(info.index_to_description(281)) == 281 and targets.resolve(7) == 7
    with pytest.raises(ValueError, match="the model has 1000 classes, 0 to 999"):
        targets.resolve(1000)
    with pytest.raises(ValueError, match="no class of the model has that name"):
        targets.resolve("tabbycat")
    crane = [i for i in range(1000) if "crane" in (s.strip() for s in info.index_to_description(i).split(","))]
    assert len(crane) == 2
    with pytest.raises(ValueError, match=f"fits 2 classes, {crane[0]} .*; {crane[1]} .*; give the index"):
        targets.resolve("crane")


def test_a_model_without_names_or_head_says_so():
    with pytest.raises(ValueError, match="7 classes have no names; give an index from 0 to 6"):
        Targets(make_model("classifier")).resolve("tabby")
    with pytest.raises(ValueError, match="no classifier head"):
        Targets(make_model("headless")).resolve(0)


def _by_hand_for(model, x, chosen: int):
    """Relevance inputs and Grad-CAM of the logit of class ``chosen``, by hand: the hand
    computations' target is the top-1 logit, and a head that puts the chosen class's weights in
    every row makes it the logit of that class, and nothing else changes."""
    hand = copy.deepcopy(model)
    with torch.no_grad():
        hand.head.weight[:] = model.head.weight[chosen]
        hand.head.bias[:] = model.head.bias[chosen]
    return hand_attention_and_gradients(hand, x), gradcam_by_hand(hand, x)


def _check_maps(outputs, b, name_suffix, hand):
    (attns, grads), gradcam = hand
    np.testing.assert_allclose(outputs["relevance"].maps["relevance" + name_suffix].ravel(),
                               relevance_by_hand(attns, grads, b, 1, True), rtol=1e-5)
    np.testing.assert_allclose(outputs["gradcam"].maps["gradcam" + name_suffix].ravel(), gradcam[-1, b], rtol=1e-5, atol=1e-9)


def test_the_maps_explain_each_chosen_class_in_order():
    model = make_model("classifier")
    x = images(2)
    with torch.no_grad():
        top1 = model(x).argmax(-1)
    first, second = [c for c in range(7) if c not in top1.tolist()][:2]  # classes no image predicts
    m = copy.deepcopy(model).double()
    methods = create_methods(("relevance", "gradcam"), AttentionSettings())
    forwards = ModelRunner(loaded(m), methods, chosen=(second, first)).run(x.double())
    layout = loaded(m).layout
    hands = {c: _by_hand_for(model, x, c) for c in (first, second)}
    for b, forward in enumerate(forwards):
        assert forward.target.class_index == second and forward.predictions[0].index == int(top1[b])
        assert forward.target.description == f"the logit of class {second}, a class chosen (attention.target_classes)"
        assert [t.class_index for t, _kept in forward.other_targets] == [first]
        outputs = {method.spec.name: maps_for_every_target(method, forward, layout) for method in methods}
        _check_maps(outputs, b, "", hands[second])
        _check_maps(outputs, b, "/target-2", hands[first])
        assert outputs["gradcam"].target_of("gradcam/target-2").class_index == first
        assert outputs["relevance"].target_of("relevance").class_index == second
        # the explorer keeps the first target's layers
        np.testing.assert_array_equal(outputs["gradcam"].layers[-1, 0], outputs["gradcam"].maps["gradcam"])


def test_top_k_explains_each_image_s_k_best_classes_as_a_batch_does_alone():
    model = make_model("classifier")
    x = images(3)
    with torch.no_grad():
        ranked = model(x).argsort(-1, descending=True)
    m = copy.deepcopy(model).double()
    methods = create_methods(("relevance", "gradcam"), AttentionSettings())
    runner = ModelRunner(loaded(m), methods, top=3)
    forwards = runner.run(x.double())
    layout = loaded(m).layout
    for b, forward in enumerate(forwards):
        explained = [forward.target] + [t for t, _kept in forward.other_targets]
        assert [t.class_index for t in explained] == ranked[b, :3].tolist()
        assert [t.description.rsplit(", ", 1)[1] for t in explained] == [
            "the top-1 prediction", "the top-2 prediction", "the top-3 prediction"]
        outputs = {method.spec.name: maps_for_every_target(method, forward, layout) for method in methods}
        for k, target in enumerate(explained):
            suffix = "" if k == 0 else f"/target-{k + 1}"
            hand = _by_hand_for(model, x, target.class_index)
            _check_maps(outputs, b, suffix, hand)
        (alone,) = runner.run(x[b : b + 1].double())
        single = {method.spec.name: maps_for_every_target(method, alone, layout) for method in methods}
        for name, grid in outputs["relevance"].maps.items():
            np.testing.assert_allclose(single["relevance"].maps[name], grid, rtol=1e-9, atol=1e-12)


def _build(tmp_path, *args, model=TINY_MODEL, **sections):
    tmp_path.mkdir(exist_ok=True)
    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], model=model, methods=["rollout", "relevance", "gradcam"], **sections)
    return CliRunner().invoke(main, ["build", str(manifest), "-o", str(tmp_path / "site"), "--quiet", *args])


def test_a_site_for_a_chosen_class_by_name(tmp_path):
    result = _build(tmp_path, "--target-class", "tabby cat")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "site" / "results.json").read_text())
    assert results["settings"]["target_classes"] == ["tabby cat"]
    record = results["images"][0]
    assert sorted(record["maps"]) == ["gradcam", "relevance", "rollout"]
    for name in ("relevance", "gradcam"):
        target = record["maps"][name]["target"]
        assert target["class_index"] == 281 and target["class_name"] == timm.data.ImageNetInfo().index_to_description(281)
        assert "a class chosen" in target["description"]
    assert "Explains class 281" in (tmp_path / "site" / record["page"]).read_text()
    # another class is another build, not a cached one
    again = _build(tmp_path, "--target-class", "282")
    assert again.exit_code == 0 and json.loads((tmp_path / "site" / "results.json").read_text())[
        "images"][0]["maps"]["gradcam"]["target"]["class_index"] == 282


def test_a_site_for_several_classes_draws_and_caches_each_target_s_maps(tmp_path):
    result = _build(tmp_path, "--target-classes", "tabby cat", "--target-classes", "282")
    assert result.exit_code == 0, result.output
    site = tmp_path / "site"
    results = json.loads((site / "results.json").read_text())
    assert results["settings"]["target_classes"] == ["tabby cat", 282]
    record = results["images"][0]
    assert sorted(record["maps"]) == ["gradcam", "gradcam/target-2", "relevance", "relevance/target-2", "rollout"]
    assert [record["maps"][f"relevance{s}"]["target"]["class_index"] for s in ("", "/target-2")] == [281, 282]
    # One tile per map in the map sprite, in the methods' order, each target's maps after the first's.
    tiles = record["figures"]["overlays"]["tiles"]
    assert sorted(tiles, key=tiles.get) == ["rollout", "relevance", "relevance_t2", "gradcam", "gradcam_t2"]
    assert map_tile(site, record["figures"], "relevance_t2").size
    assert sorted(record["scales"]["maps"]) == sorted(record["maps"])
    page = (site / record["page"]).read_text()
    assert "Explains class 281" in page and "Explains class 282" in page and "relevance/target-2" in page
    # the same settings reuse the image; top-2 is other maps
    again = _build(tmp_path, "--target-classes", "tabby cat", "--target-classes", "282")
    assert again.exit_code == 0 and json.loads((site / "results.json").read_text())["images"][0] == record
    status = json.loads((site / ".reportgen-status.json").read_text())
    assert status["entries"][record["slug"]]["record"] == record
    top = _build(tmp_path, "--target-classes", "top-2")
    assert top.exit_code == 0, top.output
    record = json.loads((site / "results.json").read_text())["images"][0]
    assert [record["maps"][f"gradcam{s}"]["target"]["description"].rsplit(", ", 1)[1] for s in ("", "/target-2")] == [
        "the top-1 prediction", "the top-2 prediction"]


def test_a_class_the_model_does_not_have_is_one_line(tmp_path):
    result = _build(tmp_path, attention={"target_classes": [5, 1000]})
    assert result.exit_code == 1
    assert result.output == ("reportgen: attention.target_classes (--target-classes) [5, 1000]: vit_tiny_patch16_224: "
                             "the model has 1000 classes, 0 to 999.\n")
    result = _build(tmp_path, "--target-classes", "tabby", "--target-classes", "281")
    assert result.exit_code == 1 and "class 281 is listed twice (entry 1 and 2)" in result.output
    headless = {**TINY_MODEL, "options": {**TINY_MODEL["options"], "num_classes": 0}}
    for chosen, written in (("tabby", "['tabby']"), ("top-2", "'top-2'")):
        result = _build(tmp_path / "h", "--target-class", chosen, model=headless)
        assert result.exit_code == 1 and result.output.count("\n") == 1
        assert f"(--target-classes) {written}: vit_tiny_patch16_224: the model has no classifier head" in result.output
    result = _build(tmp_path / "k", "--target-classes", "top-12")
    assert result.exit_code == 2 and "'--target-classes': top-k takes k from 1 to 10" in result.output


def test_the_api_takes_target_classes(tmp_path):
    from reportgen import Explainer

    write_photo(tmp_path / "a.png")
    common = {"pretrained": False, "input_size": 32, "options": TINY_MODEL["options"], "methods": ["gradcam"], "device": "cpu"}
    result = Explainer(TINY_MODEL["name"], target_classes="tabby", **common).explain(tmp_path / "a.png")
    assert result.targets["gradcam"].class_index == 281 and list(result.maps) == ["gradcam"]
    result = Explainer(TINY_MODEL["name"], target_classes=["tabby", 7], **common).explain(tmp_path / "a.png")
    assert list(result.maps) == ["gradcam", "gradcam/target-2"] and result.targets["gradcam/target-2"].class_index == 7
    with pytest.raises(ValueError, match="the model has 1000 classes"):
        Explainer(TINY_MODEL["name"], target_classes=5000, **common).explain(tmp_path / "a.png")


def test_command_line_options_keep_the_manifest_s_target_classes(tmp_path):
    result = _build(tmp_path, "--discard-ratio", "0.1", attention={"target_classes": "top-2"})
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "site" / "results.json").read_text())
    assert results["settings"]["target_classes"] == "top-2" and "gradcam/target-2" in results["images"][0]["maps"]


def test_top_k_stands_alone():
    with pytest.raises(ValueError, match=r"target_classes.1\n  'top-2': top-k stands alone"):
        classes([5, "top-2"])
