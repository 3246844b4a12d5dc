"""Grad-CAM on the tokens each block's attention reads: against a direct computation from the
norm1 outputs hooked here and torch.autograd's gradients of the target with respect to them; batch independence; the model
left as found; every prefix token left out."""

import copy

import numpy as np
import pytest
import torch
from test_relevance import GRID, MODELS, _assert_close, _assert_same, _state, _unusual_state, hand_target, images, loaded, make_model

from reportgen.config import AttentionSettings
from reportgen.methods import METHODS, create_methods
from reportgen.model.runner import ModelRunner


def gradcam_by_hand(model, x, target=hand_target):
    """Per block, Grad-CAM of the target (``target(model, final tokens)``; by default the top-1
    logit, or the label-free e · stop_gradient(e))
    from the tokens T each block's attention reads (its norm1 output), caught by forward hooks here, and G = ∂target/∂T from
    torch.autograd: w = mean of G over the patch tokens, map = ReLU(T[patches] · w). Returns
    ``[L, B, P]`` numpy arrays."""
    m = copy.deepcopy(model).double()
    outputs = []
    handles = [block.norm1.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for block in m.blocks]
    try:
        features = m.forward_features(x.double().requires_grad_(True))
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(target(m, features).sum(), outputs)
    prefix = int(m.num_prefix_tokens)
    maps = []
    for T, G in zip(outputs, grads):
        T, G = T.detach().numpy()[:, prefix:], G.numpy()[:, prefix:]
        w = G.mean(axis=1)  # [B, C]
        maps.append(np.maximum(np.einsum("bpc,bc->bp", T, w), 0))
    return np.stack(maps)


def run(model, x, names=("gradcam",)):
    methods = create_methods(names, AttentionSettings())
    layout = loaded(model).layout
    forwards = ModelRunner(loaded(model), methods).run(x)
    return [{m.spec.name: m.maps(f, layout) for m in methods} for f in forwards], forwards


@pytest.mark.parametrize("kind", list(MODELS))
def test_gradcam_equals_the_direct_computation_at_every_block(kind):
    model = make_model(kind)
    x = images(4)
    expected = gradcam_by_hand(model, x)
    outputs, forwards = run(copy.deepcopy(model).double(), x.double())
    prefix = int(model.num_prefix_tokens)
    # The ReLU zeroes a whole map when every patch's weighted sum is negative; such maps are
    # compared too, but most must have a spread for the comparison to prove anything.
    spread = [np.ptp(expected[layer, b]) > 0 for layer in range(2) for b in range(4)]
    assert sum(spread) >= 5, spread
    for b, out in enumerate(outputs):
        gradcam = out["gradcam"]
        assert gradcam.layers.shape == (2, 1, *GRID) and gradcam.maps["gradcam"].shape == GRID
        for layer in range(2):
            if np.ptp(expected[layer, b]) > 0:
                _assert_close(gradcam.layers[layer, 0].ravel(), expected[layer, b])
            else:
                np.testing.assert_allclose(gradcam.layers[layer, 0].ravel(), expected[layer, b], atol=1e-9)
        np.testing.assert_array_equal(gradcam.maps["gradcam"], gradcam.layers[-1, 0])
        assert gradcam.target is forwards[b].target
        assert forwards[b].target.kind == ("class" if model.num_classes else "label-free")
        assert "the map's target" in gradcam.provenance
        assert gradcam.prefix == {}
        assert f"the {prefix} prefix token" in gradcam.provenance if prefix else "prefix" not in gradcam.provenance


def test_gradcam_with_the_attention_gradient_methods_gives_the_same_maps():
    model = make_model("distilled")
    x = images(2)
    alone, _ = run(model, x)
    together, _ = run(model, x, names=("relevance", "gradcam", "grad-rollout"))
    for one, both in zip(alone, together):
        np.testing.assert_allclose(both["gradcam"].layers, one["gradcam"].layers, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["classifier", "registers-gap"])
def test_a_batch_of_three_gives_the_maps_of_three_single_images(kind):
    model = make_model(kind)
    x = images(3, seed=5)
    batched, _ = run(model, x)
    for b in range(3):
        (single,), _ = run(model, x[b : b + 1])
        np.testing.assert_allclose(batched[b]["gradcam"].layers, single["gradcam"].layers, rtol=1e-4, atol=1e-6)


def test_the_model_is_left_as_it_was_found_and_fused_attention_stays_on():
    model = make_model("classifier")
    _unusual_state(model)
    before = _state(model)
    seen = []
    handle = model.blocks[0].attn.register_forward_hook(lambda m, i, o: seen.append(m.fused_attn))
    before["hooks"] += 1
    try:
        run(model, images(2))
    finally:
        _assert_same(before, _state(model))
        handle.remove()
    assert seen == [True]  # Grad-CAM needs no attention on the graph: the model's own setting holds


def test_the_model_is_left_as_it_was_found_after_an_error_in_the_pass():
    model = make_model("headless")
    _unusual_state(model)

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


def test_gradcam_is_a_targeted_method_in_all():
    spec = METHODS["gradcam"]
    assert spec.targeted and spec.maps == (("gradcam", "gradcam"),) and spec.explorer == "one"


def test_a_build_whose_methods_read_no_attention_computes_none(monkeypatch):
    """Grad-CAM alone reads no attention: the capture only checks that every layer ran."""
    from reportgen.model import capture

    computed = []
    real = capture.AttentionCapture._from_qkv

    def counting(self, index, module):
        hook = real(self, index, module)

        def wrapped(*args):
            computed.append(self._on_layer is not None)
            return hook(*args)

        return wrapped

    monkeypatch.setattr(capture.AttentionCapture, "_from_qkv", counting)
    model = make_model("classifier")
    ModelRunner(loaded(model), create_methods(("gradcam",), AttentionSettings())).run(images(1))
    assert computed == [False] * len(model.blocks)
    computed.clear()
    ModelRunner(loaded(model), create_methods(("gradcam", "rollout"), AttentionSettings())).run(images(1))
    assert computed == [True] * len(model.blocks)
