"""Gradient methods (relevance, grad-rollout): against hand computations on tiny models whose
attention is written out from the qkv weights and whose gradients torch.autograd takes through
that hand-written forward; batch independence; the model left as found, also after an error."""

import copy
import math

import numpy as np
import pytest
import timm
import torch

from reportgen.config import AttentionSettings
from reportgen.methods import METHODS, create_methods
from reportgen.model.loading import LoadedModel
from reportgen.model.runner import ModelRunner

TINY = {"img_size": (16, 24), "patch_size": 8, "depth": 2, "embed_dim": 24, "num_heads": 3}
GRID = (2, 3)

#: name -> (timm architecture, options): a classifier, a headless model, registers with global
#: average pooling (no CLS token), and a distilled DeiT (two prefix tokens, two heads).
MODELS = {
    "classifier": ("vit_tiny_patch16_224", {"num_classes": 7}),
    "headless": ("vit_tiny_patch16_224", {"num_classes": 0}),
    "registers-gap": ("vit_tiny_patch16_224", {"num_classes": 0, "reg_tokens": 2, "class_token": False, "global_pool": "avg"}),
    "distilled": ("deit_tiny_distilled_patch16_224", {"num_classes": 5}),
}


def make_model(kind: str, seed: int = 0) -> torch.nn.Module:
    architecture, options = MODELS[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(architecture, pretrained=False, **TINY, **options)
        # Sharper attention than timm's small initial weights, so the maps are far from the
        # identity's share (and the comparisons below are not met by any near-constant map).
        for block in model.blocks:
            torch.nn.init.normal_(block.attn.qkv.weight, std=0.5)
            torch.nn.init.normal_(block.mlp.fc2.weight, std=0.5)
        # timm starts some heads at zero; random ones give every class a gradient to explain.
        if model.num_classes:
            for head in (model.head, getattr(model, "head_dist", None)):
                if head is not None:
                    torch.nn.init.normal_(head.weight, std=0.5)
    return model.eval()


def loaded(model) -> LoadedModel:
    return LoadedModel(
        model=model, name="tiny", architecture="vit", source="random", weights_file=None, weights_sha256=None,
        data_config={"input_size": (3, 16, 24)}, num_prefix_tokens=int(model.num_prefix_tokens), grid=GRID,
        patch_size=(8, 8), device=torch.device("cpu"), class_token=model.cls_token is not None,
    )


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 24, generator=torch.Generator().manual_seed(seed))


def hand_target(m, features):
    """The default target: the top-1 logit, or for a headless model e · stop_gradient(e) of the
    pooled embedding e."""
    if m.num_classes:
        logits = m.forward_head(features)
        return logits.gather(1, logits.argmax(-1, keepdim=True))[:, 0]
    e = m.forward_head(features, pre_logits=True)
    return (e * e.detach()).sum(-1)


def hand_attention_and_gradients(model, x, target=hand_target):
    """Each layer's attention ``[B, H, N, N]`` from a forward written out here in float64 (softmax
    of Q Kᵀ / √d from each block's qkv weights, A V through the projection, the residuals), the
    target (``target(model, final tokens)``, by default :func:`hand_target`) and torch.autograd's
    gradient of it with respect to each A. Returns numpy arrays."""
    m = copy.deepcopy(model).double()
    attns = []
    h = m.norm_pre(m._pos_embed(m.patch_embed(x.double())))
    for block in m.blocks:
        a = block.attn
        y = block.norm1(h)
        B, N, C = y.shape
        heads = a.num_heads
        d = C // heads
        qkv = (y @ a.qkv.weight.T + a.qkv.bias).reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        A = torch.exp(scores - scores.amax(-1, keepdim=True))
        A = A / A.sum(-1, keepdim=True)
        attns.append(A)
        out = (A @ v).transpose(1, 2).reshape(B, N, C) @ a.proj.weight.T + a.proj.bias
        h = h + block.ls1(out)
        h = h + block.ls2(block.mlp(block.norm2(h)))
    features = m.norm(h)
    grads = torch.autograd.grad(target(m, features).sum(), attns)
    return [A.detach().numpy() for A in attns], [g.numpy() for g in grads]


def query_row(matrix: np.ndarray, prefix: int, cls: bool) -> np.ndarray:
    return matrix[0] if cls else matrix[prefix:].mean(axis=0)


def relevance_by_hand(attns, grads, b, prefix, cls):
    """Chefer et al. 2021: R = I; per block R += mean_h((∇A ⊙ A)⁺) @ R; the query's row over patches."""
    n = attns[0].shape[-1]
    R = np.eye(n)
    for A, G in zip(attns, grads):
        abar = np.maximum(G[b] * A[b], 0).mean(axis=0)
        R = R + abar @ R
    return query_row(R, prefix, cls)[prefix:]


def grad_rollout_by_hand(attns, grads, b, prefix, cls, discard=0.0):
    """Per layer mean_h(A ⊙ ∇A) clamped at 0, the lowest ``discard`` of its entries zeroed (not
    entry 0), (a + I)/2 with rows renormalised, joint = a @ joint; the query's row over patches."""
    n = attns[0].shape[-1]
    joint = np.eye(n)
    for A, G in zip(attns, grads):
        a = np.maximum((A[b] * G[b]).mean(axis=0), 0)
        count = int(n * n * discard)
        if count:
            flat = a.ravel().copy()
            lowest = [i for i in np.argsort(flat, kind="stable")[:count] if i != 0]
            flat[lowest] = 0
            a = flat.reshape(n, n)
        a = 0.5 * a + 0.5 * np.eye(n)
        a = a / a.sum(axis=1, keepdims=True)
        joint = a @ joint
    return query_row(joint, prefix, cls)[prefix:]


def _assert_close(actual, expected, base=0.0):
    """Equal, measured against the map's own spread over the patches once ``base`` (the
    identity's share, 1/P in every patch for the mean of the patch rows) is taken off: a constant
    map, or one whose spread is lost in rounding, would prove nothing."""
    actual, expected = actual - base, expected - base
    spread = np.ptp(expected)
    assert spread > 1e-3 * np.abs(expected).max(), "a degenerate case: the map is nearly constant"
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4 * spread)


def run(model, x, discard=0.0, names=("relevance", "grad-rollout")):
    methods = create_methods(names, AttentionSettings(discard_ratio=discard))
    layout = loaded(model).layout
    forwards = ModelRunner(loaded(model), methods).run(x)
    return [{m.spec.name: m.maps(f, layout) for m in methods} for f in forwards], forwards


@pytest.mark.parametrize("kind", list(MODELS))
def test_relevance_and_grad_rollout_equal_the_hand_computation(kind):
    model = make_model(kind)
    x = images(2)
    attns, grads = hand_attention_and_gradients(model, x)
    prefix, cls = int(model.num_prefix_tokens), model.cls_token is not None
    # In float64, as the hand computation: the sharp attention saturates float32's softmax
    # gradients by a few percent, which would hide a wrong formula of the same size.
    outputs, forwards = run(copy.deepcopy(model).double(), x.double())
    for b, out in enumerate(outputs):
        relevance = out["relevance"].maps["relevance"].ravel()
        expected = relevance_by_hand(attns, grads, b, prefix, cls)
        base = 0.0 if cls else 1 / relevance.size
        _assert_close(relevance, expected, base)
        rolled = out["grad-rollout"].maps["grad-rollout"].ravel()
        _assert_close(rolled, grad_rollout_by_hand(attns, grads, b, prefix, cls), base)
        # The explorer's last layer is the map; its first is one block's step.
        assert out["relevance"].layers.shape == (2, 1, *GRID)
        np.testing.assert_allclose(out["relevance"].layers[-1, 0], out["relevance"].maps["relevance"])
        target = forwards[b].target
        assert out["relevance"].target is target and target.kind == ("class" if model.num_classes else "label-free")
        assert "the map's target" in out["relevance"].provenance


def test_grad_rollout_discards_the_lowest_entries_as_configured():
    model = make_model("headless")
    x = images(1)
    attns, grads = hand_attention_and_gradients(model, x)
    outputs, _ = run(copy.deepcopy(model).double(), x.double(), discard=0.3, names=("grad-rollout",))
    expected = grad_rollout_by_hand(attns, grads, 0, 1, True, discard=0.3)
    _assert_close(outputs[0]["grad-rollout"].maps["grad-rollout"].ravel(), expected)
    assert "lowest 0.3 of each layer discarded" in outputs[0]["grad-rollout"].provenance


@pytest.mark.parametrize("kind", ["classifier", "headless"])
def test_a_batch_of_three_gives_the_maps_of_three_single_images(kind):
    # In float64: the tiny model's maps are ~1e-6 sums of products that cancel, so float32's
    # batch-dependent kernels alone move them by several percent.
    model = make_model(kind).double()
    x = images(3, seed=5).double()
    batched, _ = run(model, x)
    for b in range(3):
        (single,), _ = run(model, x[b : b + 1])
        for name in ("relevance", "grad-rollout"):
            top = np.abs(single[name].layers).max()
            np.testing.assert_allclose(batched[b][name].maps[name], single[name].maps[name], rtol=1e-7, atol=1e-9 * top)
            np.testing.assert_allclose(batched[b][name].layers, single[name].layers, rtol=1e-7, atol=1e-9 * top)


def test_the_classifier_target_is_the_top_class_with_the_top_five_predictions():
    model = make_model("classifier")
    x = images(2)
    with torch.no_grad():
        probs = model(x).softmax(-1)
    _, forwards = run(model, x)
    for b, forward in enumerate(forwards):
        top = probs[b].argsort(descending=True)[:5]
        assert forward.target.class_index == int(top[0]) and forward.target.class_name is None
        assert [p.index for p in forward.predictions] == top.tolist()
        assert [p.probability for p in forward.predictions] == pytest.approx(probs[b][top].tolist(), abs=1e-6)
        assert forward.target.description == f"the logit of class {int(top[0])}, the top-1 prediction"


def test_an_imagenet_classifier_names_its_classes():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    (forward,) = ModelRunner(loaded(model), create_methods(("relevance",), AttentionSettings())).run(images(1))
    info = timm.data.ImageNetInfo()
    assert forward.target.class_name == info.index_to_description(forward.target.class_index)
    assert forward.target.class_name in forward.target.description
    assert [p.name for p in forward.predictions] == [info.index_to_description(p.index) for p in forward.predictions]


def _state(model):
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "fused": [m.__dict__.get("fused_attn", "absent") for m in model.modules() if isinstance(m, timm.layers.Attention)],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "rng": torch.get_rng_state(),
        "global_fused": timm.layers.use_fused_attn(),
    }


def _assert_same(before, after):
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert [g is None for g in after["grad"]] == [g is None for g in before["grad"]]
    assert all(torch.equal(a, b) for a, b in zip(after["grad"], before["grad"]) if a is not None)
    assert after["fused"] == before["fused"]
    assert after["hooks"] == before["hooks"]
    assert torch.equal(after["rng"], before["rng"])
    assert after["global_fused"] == before["global_fused"]


def _unusual_state(model):
    """Fused attention on in one block and off in the other, a frozen parameter, a .grad left
    by the user: all must come back as they were."""
    model.blocks[0].attn.fused_attn = True
    model.blocks[1].attn.fused_attn = False
    model.patch_embed.proj.weight.requires_grad_(False)
    model.blocks[0].attn.qkv.weight.grad = torch.full_like(model.blocks[0].attn.qkv.weight, 0.25)


def test_the_model_is_left_as_it_was_found():
    model = make_model("classifier")
    _unusual_state(model)
    before = _state(model)
    run(model, images(2))
    _assert_same(before, _state(model))


def test_a_frozen_model_still_gets_gradients():
    model = make_model("headless")
    reference, _ = run(model, images(1))
    for p in model.parameters():
        p.requires_grad_(False)
    frozen, _ = run(model, images(1))
    np.testing.assert_allclose(frozen[0]["relevance"].maps["relevance"], reference[0]["relevance"].maps["relevance"], rtol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())


def test_the_model_is_left_as_it_was_found_after_an_error_in_the_pass():
    model = make_model("headless")
    _unusual_state(model)
    before = _state(model)

    def fail(*_args):
        raise RuntimeError("boom")

    handle = model.blocks[1].register_forward_hook(fail)
    try:
        before = _state(model)
        with pytest.raises(RuntimeError, match="boom"):
            run(model, images(2))
        _assert_same(before, _state(model))
    finally:
        handle.remove()
    # and the model still works, with the same maps as a model never interrupted
    again, _ = run(model, images(1))
    fresh = make_model("headless")
    _unusual_state(fresh)
    expected, _ = run(fresh, images(1))
    np.testing.assert_allclose(again[0]["relevance"].maps["relevance"], expected[0]["relevance"].maps["relevance"])


def test_an_attention_build_runs_without_autograd():
    """Without a gradient method the pass stays under inference mode: no graph, fused attention used."""
    model = make_model("headless")
    seen = []
    handle = model.blocks[0].attn.register_forward_hook(lambda m, i, o: seen.append((o.requires_grad, torch.is_inference(o))))
    try:
        ModelRunner(loaded(model), create_methods(("attention", "rollout"), AttentionSettings())).run(images(1))
        ModelRunner(loaded(model), create_methods(("rollout", "relevance"), AttentionSettings())).run(images(1))
    finally:
        handle.remove()
    assert seen == [(False, True), (True, False)]


def test_every_method_is_in_all_and_the_defaults_are_unchanged():
    from reportgen.config.schema import DEFAULT_METHODS

    assert {"relevance", "grad-rollout", "gradcam"} <= set(METHODS) and DEFAULT_METHODS == ("attention", "rollout")
    assert METHODS["relevance"].targeted and METHODS["grad-rollout"].targeted and not METHODS["rollout"].targeted


def _site(tmp_path, model):
    import json

    from click.testing import CliRunner
    from conftest import write_manifest, write_photo

    from reportgen.cli import main

    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], model=model, methods="all")
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    again = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out)])
    assert again.exit_code == 0 and "1 unchanged" in again.output, again.output  # the cache takes the record back
    record = json.loads((out / "results.json").read_text())["images"][0]
    return record, (out / record["page"]).read_text(), out


def test_a_classifier_site_names_the_target_class_and_lists_the_top_five(tmp_path):
    from conftest import TINY_MODEL, map_tile
    from sitecheck import disagreements

    record, page, out = _site(tmp_path, TINY_MODEL)  # 1000 classes: ImageNet's names
    names = timm.data.ImageNetInfo()
    for name in ("relevance", "grad-rollout", "gradcam"):
        target = record["maps"][name]["target"]
        assert target["kind"] == "class" and target["class_name"] == names.index_to_description(target["class_index"])
        assert target["class_name"] in target["description"] and "the map's target" in record["maps"][name]["provenance"]
        assert map_tile(out, record["figures"], record["maps"][name]["figure"]).size
    predictions = record["predictions"]
    assert len(predictions) == 5 and predictions[0]["index"] == record["maps"]["relevance"]["target"]["class_index"]
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
    assert "top 5 predictions" in page and f"Explains class {predictions[0]['index']}" in page
    assert all(p["name"] in page.replace("&#39;", "'") for p in predictions)
    checked, problems = disagreements(out)
    assert checked and not problems, problems


def test_a_headless_site_explains_the_label_free_target(tmp_path):
    from conftest import TINY_MODEL

    record, page, _ = _site(tmp_path, {**TINY_MODEL, "options": {**TINY_MODEL["options"], "num_classes": 0}})
    assert record["maps"]["relevance"]["target"]["kind"] == "label-free" and "predictions" not in record
    assert "label-free target" in page and "predictions" not in page


def test_the_api_runs_every_method_with_all_and_names_the_targets(tmp_path):
    from conftest import TINY_MODEL, write_photo

    from reportgen import Explainer

    write_photo(tmp_path / "a.png")
    ex = Explainer(TINY_MODEL["name"], pretrained=False, input_size=32, options=TINY_MODEL["options"], methods="all", device="cpu")
    result = ex.explain(tmp_path / "a.png")
    assert {"relevance", "grad-rollout", "gradcam", "rollout", "attention/mean"} <= set(result.maps)
    assert set(result.targets) == {"relevance", "grad-rollout", "gradcam"}
    assert result.targets["relevance"].class_index == result.predictions[0].index


@pytest.mark.offline_model
def test_the_label_free_relevance_of_the_offline_model_lies_on_the_object():
    """On the offline model (headless: the label-free target), the relevance map's share inside a
    box against the box's share of the image, computed here from the box's patch coverage. The
    README gives the figures for every sample box; asserted on the two with a clear margin
    (motorcycle 0.87 vs 0.69, rocket 0.056 vs 0.026)."""
    from pathlib import Path

    from conftest import coverage_by_hand

    from reportgen import Explainer
    from reportgen.config import load_manifest

    manifest = load_manifest(Path(__file__).resolve().parents[1] / "images" / "manifest.yaml")
    ex = Explainer("imgfocus-vits14", input_size=224, methods=("relevance",), device="cpu")
    for image, label in (("motorcycle", "motorcycle"), ("rocket", "rocket")):
        entry = next(e for e in manifest.images if e.id == image)
        box = next(b for b in entry.objects if b.label == label)
        result = ex.explain(entry.path, boxes={label: box.as_tuple()}).result
        assert result.targets["relevance"].kind == "label-free" and result.predictions is None
        input_box, _ = result.geometry.map_box(box.as_tuple())
        grid = result.maps["relevance"].ravel()
        inside = (coverage_by_hand(input_box, (16, 16), 14) * grid).sum() / (result.content.weights.ravel() * grid).sum()
        x0, y0, x1, y1 = result.geometry.content_box()
        share = (input_box[2] - input_box[0]) * (input_box[3] - input_box[1]) / ((x1 - x0) * (y1 - y0))
        assert inside > 1.2 * share, (image, inside, share)
