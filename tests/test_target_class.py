"""One chosen class for the gradient methods (attention.target_class, --target-class,
Explainer(target_class=)): the syntax checked by the settings, the class checked against the
loaded model in one line, and the maps equal to those of a direct computation for that class."""

import copy

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from conftest import TINY_MODEL, write_manifest, write_photo
from test_gradcam import gradcam_by_hand
from test_relevance import hand_attention_and_gradients, images, loaded, make_model, relevance_by_hand

from reportgen.cli import main
from reportgen.config import AttentionSettings
from reportgen.methods import create_methods
from reportgen.model.runner import ModelRunner
from reportgen.model.targets import Targets


def test_the_setting_takes_an_index_digits_or_a_name_and_refuses_the_rest():
    assert AttentionSettings(target_class="281").target_class == 281 and AttentionSettings(target_class=" 7 ").target_class == 7
    assert AttentionSettings(target_class=3).target_class == 3
    assert AttentionSettings(target_class=" tabby ").target_class == "tabby"
    for bad, shown in ((-1, "-1"), ("-3", "-3"), (True, "true"), ("", "''"), (2.5, "2.5")):
        with pytest.raises(ValueError, match=f"expected a class index .* got {shown}"):
            AttentionSettings(target_class=bad)


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


def test_the_maps_explain_the_chosen_class():
    model = make_model("classifier")
    x = images(2)
    with torch.no_grad():
        top1 = model(x).argmax(-1)
    chosen = next(c for c in range(7) if c not in top1.tolist())  # a class no image predicts
    m = copy.deepcopy(model).double()
    methods = create_methods(("relevance", "gradcam"), AttentionSettings())
    forwards = ModelRunner(loaded(m), methods, target_class=chosen).run(x.double())
    layout = loaded(m).layout

    # The hand computations' target is the top-1 logit; a head that puts the chosen class's
    # weights in every row makes it the logit of the chosen class, and nothing else changes.
    hand = copy.deepcopy(model)
    with torch.no_grad():
        hand.head.weight[:] = model.head.weight[chosen]
        hand.head.bias[:] = model.head.bias[chosen]
    attns, grads = hand_attention_and_gradients(hand, x)
    gradcam = gradcam_by_hand(hand, x)
    for b, forward in enumerate(forwards):
        assert forward.target.class_index == chosen and forward.predictions[0].index == int(top1[b])
        assert forward.target.description == f"the logit of class {chosen}, the class chosen (attention.target_class)"
        relevance = methods[0].maps(forward, layout)
        np.testing.assert_allclose(relevance.maps["relevance"].ravel(), relevance_by_hand(attns, grads, b, 1, True), rtol=1e-5)
        assert "the class chosen" in relevance.provenance
        np.testing.assert_allclose(methods[1].maps(forward, layout).layers[:, 0].reshape(2, -1), gradcam[:, b], rtol=1e-5, atol=1e-9)


def _build(tmp_path, *args, model=TINY_MODEL, **sections):
    tmp_path.mkdir(exist_ok=True)
    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], model=model, methods=["rollout", "relevance", "gradcam"], **sections)
    return CliRunner().invoke(main, ["build", str(manifest), "-o", str(tmp_path / "site"), "--quiet", *args])


def test_a_site_for_a_chosen_class_by_name(tmp_path):
    import json

    result = _build(tmp_path, "--target-class", "tabby cat")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "site" / "results.json").read_text())
    assert results["settings"]["target_class"] == "tabby cat"
    record = results["images"][0]
    for name in ("relevance", "gradcam"):
        target = record["maps"][name]["target"]
        assert target["class_index"] == 281 and target["class_name"] == timm.data.ImageNetInfo().index_to_description(281)
        assert "the class chosen" in target["description"]
    assert "Explains class 281" in (tmp_path / "site" / record["page"]).read_text()
    # another class is another build, not a cached one
    again = _build(tmp_path, "--target-class", "282")
    assert again.exit_code == 0 and json.loads((tmp_path / "site" / "results.json").read_text())[
        "images"][0]["maps"]["gradcam"]["target"]["class_index"] == 282


def test_a_class_the_model_does_not_have_is_one_line(tmp_path):
    result = _build(tmp_path, attention={"target_class": 1000})
    assert result.exit_code == 1
    assert result.output == ("reportgen: attention.target_class (--target-class) 1000: vit_tiny_patch16_224: "
                             "the model has 1000 classes, 0 to 999.\n")
    headless = {**TINY_MODEL, "options": {**TINY_MODEL["options"], "num_classes": 0}}
    result = _build(tmp_path / "h", "--target-class", "tabby", model=headless)
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "(--target-class) 'tabby': vit_tiny_patch16_224: the model has no classifier head" in result.output


def test_the_api_takes_a_target_class(tmp_path):
    from reportgen import Explainer

    write_photo(tmp_path / "a.png")
    common = {"pretrained": False, "input_size": 32, "options": TINY_MODEL["options"], "methods": ["gradcam"], "device": "cpu"}
    result = Explainer(TINY_MODEL["name"], target_class="tabby", **common).explain(tmp_path / "a.png")
    assert result.targets["gradcam"].class_index == 281
    with pytest.raises(ValueError, match="the model has 1000 classes"):
        Explainer(TINY_MODEL["name"], target_class=5000, **common).explain(tmp_path / "a.png")
