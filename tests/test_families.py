"""timm ViT families: each loads from a tiny random config, its captured attention equals the
family's own maths written out here from the module's weights (rotary position embedding and
relative position bias included), so do the attention and its gradient on the autograd graph,
every map method runs on it, and the model is left as found. Windowed families are refused at
load with the reason."""

import math
from typing import NamedTuple

import numpy as np
import pytest
import timm.layers
import torch

from reportgen.config import AttentionSettings, ModelSettings
from reportgen.errors import ModelLoadError
from reportgen.methods import CLS_QUERY, METHODS, PATCH_MEAN_QUERY, create_methods
from reportgen.model.adapters import TimmAdapter
from reportgen.model.loading import load_model
from reportgen.model.runner import ModelRunner

TINY = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
SIZE = 32  # a 4 x 4 patch grid
REGISTERS = ("register",) * 4


class Family(NamedTuple):
    architecture: str  # timm name
    options: dict
    prefix_kinds: tuple[str, ...]
    class_token: bool  # the output is read from the class token
    extra: str | None  # what the logits add to q kᵀ: "rotary", "bias" or nothing
    path: str  # "qkv": recomputed from the qkv projection, "softmax": the module's own softmax


FAMILIES = {
    "EVA-02": Family("eva02_tiny_patch14_224", {"num_classes": 5}, ("cls",), False, "rotary", "softmax"),
    "EVA-01": Family("eva_giant_patch14_224", {"num_classes": 0}, ("cls",), False, None, "softmax"),
    "EVA rope, register, avg": Family(
        "vit_medium_patch16_rope_reg1_gap_256", {"num_classes": 0}, ("register",), False, "rotary", "softmax"
    ),
    "EVA-02 CLIP, post-norm": Family("eva02_enormous_patch14_clip_224", {"num_classes": 5}, ("cls",), True, None, "softmax"),
    "Perception Encoder": Family("vit_pe_core_tiny_patch16_384", {"num_classes": 0}, ("cls",), False, "rotary", "softmax"),
    "BEiT": Family("beit_base_patch16_224", {"num_classes": 5}, ("cls",), False, "bias", "softmax"),
    "ViT relpos": Family("vit_relpos_small_patch16_224", {"num_classes": 5}, (), False, "bias", "softmax"),
    "DeiT-III": Family("deit3_small_patch16_224", {"num_classes": 5}, ("cls",), True, None, "qkv"),
    "CLIP": Family("vit_base_patch16_clip_224", {"num_classes": 0}, ("cls",), True, None, "qkv"),
    "DINOv2 registers": Family("vit_small_patch14_reg4_dinov2", {}, ("cls", *REGISTERS), True, None, "qkv"),
    "SigLIP": Family("vit_base_patch16_siglip_224", {}, (), False, None, "qkv"),
}


def load(family: str):
    """The family's tiny model through reportgen's loader, with sharper attention than timm's
    small initial weights, so the logits' extra terms change the probabilities visibly."""
    architecture, options = FAMILIES[family].architecture, FAMILIES[family].options
    loaded = load_model(ModelSettings(name=architecture, pretrained=False, input_size=SIZE, options={**TINY, **options}), "cpu")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if name.endswith(("qkv.weight", "q_bias", "attn.proj.weight", "relative_position_bias_table")) or ".rel_pos." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
            if name.startswith(("head.", "fc_norm.")) and parameter.ndim == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return loaded


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Each interleaved pair (x0, x1) of the last dimension turned by 90°: (-x1, x0)."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)


def family_attention(model, attn, x: torch.Tensor, extra: str | None, with_values: bool = False):
    """``[B, H, N, N]`` attention probabilities of ``attn`` on its input ``x``, in float64, written
    out from its weights (and, with ``with_values``, also the ``[B, H, N, d]`` values):

    - q, k, v from the fused qkv weight; the bias is qkv's own, or (BEiT, EVA) q_bias and v_bias
      with no key bias;
    - rotary (EVA): each patch token's q and k rotated pairwise, q·cos + rot(q)·sin, with the
      sin/cos table of the model's rotary embedding; prefix tokens are not rotated;
    - bias (BEiT): the learnt table indexed by each token pair's relative position; (relpos ViT)
      the bias its MLP produces from the relative coordinates;
    - softmax(q kᵀ / √d + bias).
    """
    for norm in ("q_norm", "k_norm"):  # none of these tiny models normalises q or k
        assert isinstance(getattr(attn, norm, torch.nn.Identity()), torch.nn.Identity)
    x = x.double()
    B, N, C = x.shape
    heads = attn.num_heads
    d = C // heads
    weight = attn.qkv.weight.double()
    if attn.qkv.bias is not None:
        bias = attn.qkv.bias.double()
    elif getattr(attn, "q_bias", None) is not None:
        bias = torch.cat([attn.q_bias.double(), torch.zeros(C, dtype=torch.float64), attn.v_bias.double()])
    else:
        bias = torch.zeros(3 * C, dtype=torch.float64)
    q, k, v = ((x @ weight[i * C : (i + 1) * C].T + bias[i * C : (i + 1) * C]).reshape(B, N, heads, d).transpose(1, 2) for i in range(3))
    if extra == "rotary":
        prefix = model.num_prefix_tokens
        sin, cos = model.rope.get_embed().double().chunk(2, dim=-1)  # [patches, d] each
        q = torch.cat([q[:, :, :prefix], q[:, :, prefix:] * cos + rotate_pairs(q[:, :, prefix:]) * sin], dim=2)
        k = torch.cat([k[:, :, :prefix], k[:, :, prefix:] * cos + rotate_pairs(k[:, :, prefix:]) * sin], dim=2)
    logits = q @ k.transpose(-2, -1) / math.sqrt(d)
    if extra == "bias" and hasattr(attn, "relative_position_bias_table"):
        table = attn.relative_position_bias_table.double()  # [relative positions, heads]
        logits = logits + table[attn.relative_position_index.reshape(-1)].reshape(N, N, heads).permute(2, 0, 1)
    elif extra == "bias":
        logits = logits + attn.rel_pos.get_bias().double()
    logits = logits - logits.amax(dim=-1, keepdim=True)
    probabilities = logits.exp() / logits.exp().sum(dim=-1, keepdim=True)
    return (probabilities, v) if with_values else probabilities


def fused_flags(model) -> list:
    return [module.__dict__.get("fused_attn", "class") for module in model.modules() if hasattr(module, "fused_attn")]


def assert_left_as_found(model, flags) -> None:
    assert fused_flags(model) == flags
    assert timm.layers.use_fused_attn() == FUSED_GLOBALLY
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, type(module).__name__
    for parameter in model.parameters():
        assert parameter.grad is None


FUSED_GLOBALLY = timm.layers.use_fused_attn()


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_with_the_family_token_layout(family):
    kinds, class_token = FAMILIES[family].prefix_kinds, FAMILIES[family].class_token
    loaded = load(family)
    assert loaded.grid == (4, 4) and loaded.patch_size == (8, 8) and loaded.depth == 2 and loaded.heads == 2
    assert loaded.num_prefix_tokens == len(kinds) and loaded.prefix_kinds == kinds
    assert loaded.class_token is class_token
    assert loaded.layout.query is (CLS_QUERY if class_token else PATCH_MEAN_QUERY)
    assert loaded.adapter.library == "timm"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("on_graph", [False, True], ids=["inference", "gradient pass"])
def test_captured_attention_is_the_family_maths(family, on_graph):
    extra = FAMILIES[family].extra
    loaded = load(family)
    model, adapter = loaded.model, loaded.adapter
    flags = fused_flags(model)
    inputs = {}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, kwargs, index=index: inputs.__setitem__(index, (args[0] if args else kwargs["x"]).detach()),
            with_kwargs=True,
        )
        for index, name in enumerate(adapter.layer_names)
    ]
    captured, on_graph_attention = {}, {}
    try:
        with adapter.attention_capture(lambda i, a: captured.__setitem__(i, a.clone())) as capture:
            if not on_graph:
                capture.begin()
                with torch.inference_mode():
                    adapter.forward_features(images())
                capture.check_complete()
            else:
                with adapter.attention_gradients(lambda i, a, g: on_graph_attention.__setitem__(i, a.clone())) as layers:
                    with torch.enable_grad():
                        capture.begin()
                        layers.begin()
                        features = adapter.forward_features(images().requires_grad_(True))
                        capture.check_complete()
                        layers.check_complete()
                        torch.autograd.grad(features.square().sum(), layers.first())
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(captured) == [0, 1] and len(adapter.layer_names) == 2
    for index, attn in captured.items():
        module = model.get_submodule(adapter.layer_names[index])
        expected = family_attention(model, module, inputs[index], extra)
        assert attn.dtype == torch.float32 and attn.shape == expected.shape
        torch.testing.assert_close(attn.double(), expected, atol=2e-6, rtol=1e-4)
        if on_graph:
            torch.testing.assert_close(on_graph_attention[index].double(), expected, atol=2e-6, rtol=1e-4)
        if extra is not None:
            # The rotary embedding or bias matters here: without it the maths gives other numbers.
            plain = family_attention(model, module, inputs[index], None)
            assert (plain - expected).abs().max() > 1e-2
    assert_left_as_found(model, flags)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_map_method_runs(family):
    loaded = load(family)
    flags = fused_flags(loaded.model)
    requires_grad = [p.requires_grad for p in loaded.model.parameters()]
    methods = create_methods(tuple(METHODS), AttentionSettings())
    runner = ModelRunner(loaded, methods)
    forwards = runner.run(images())
    assert runner.capture_info.layers == loaded.adapter.layer_names
    path = {"softmax": "own softmax output", "qkv": "qkv projection"}[FAMILIES[family].path]
    assert path in runner.capture_info.method
    for forward in forwards:
        for method in methods:
            out = method.maps(forward, loaded.layout)
            assert out.maps, method.spec.name
            for name, values in out.maps.items():
                assert values.shape == (4, 4) and np.isfinite(values).all(), (method.spec.name, name)
    assert_left_as_found(loaded.model, flags)
    assert [p.requires_grad for p in loaded.model.parameters()] == requires_grad


def test_windowed_attention_is_refused_with_the_reason():
    settings = ModelSettings(
        name="swin_tiny_patch4_window7_224", pretrained=False, input_size=32,
        options={"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 1), "window_size": 4},
    )
    with pytest.raises(ModelLoadError, match=r"not supported, because its attention is computed inside local windows.*WindowAttention.*no global token"):
        load_model(settings, "cpu")


def test_a_vit_with_attention_reportgen_cannot_read_is_refused_at_load():
    settings = ModelSettings(name="cait_xxs24_224", pretrained=False, input_size=32, options={"depth": 1, "depth_token_only": 1, "patch_size": 8})
    with pytest.raises(ModelLoadError, match=r"'cait_xxs24_224' is not supported: Cait has no timm Attention modules \(it has .*ClassAttn"):
        load_model(settings, "cpu")


def test_token_gradients_are_what_the_attention_reads_also_in_a_post_norm_block():
    """EVA-02 CLIP's post-norm blocks apply norm1 after the attention, which reads the block's
    input itself: Grad-CAM's tokens must be that input, not norm1's output."""
    loaded = load("EVA-02 CLIP, post-norm")
    model, adapter = loaded.model, loaded.adapter
    assert type(model.blocks[0]).__name__ == "EvaBlockPostNorm"
    block_inputs, tokens = {}, {}
    hooks = [
        block.register_forward_pre_hook(lambda _m, args, index=index: block_inputs.__setitem__(index, args[0].detach().clone()))
        for index, block in enumerate(model.blocks)
    ]
    try:
        with adapter.block_gradients(lambda i, t, g: tokens.__setitem__(i, (t.clone(), g.clone()))) as blocks, torch.enable_grad():
            blocks.begin()
            features = adapter.forward_features(images())
            blocks.check_complete()
            torch.autograd.grad(adapter.forward_head(features).sum(), blocks.first())
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(tokens) == [0, 1]
    for index, (seen, grad) in tokens.items():
        torch.testing.assert_close(seen, block_inputs[index])
        assert grad.shape == seen.shape and grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["EVA-02", "BEiT"])
def test_the_model_is_left_as_found_when_a_pass_fails(family):
    loaded = load(family)
    flags = fused_flags(loaded.model)

    def boom(_index, _attn):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with loaded.adapter.attention_capture(boom) as capture, loaded.adapter.attention_gradients(lambda *a: None):
            capture.begin()
            loaded.adapter.forward_features(images())
    assert_left_as_found(loaded.model, flags)


@pytest.mark.parametrize("family", [f for f, spec in FAMILIES.items() if spec.path == "softmax"])
def test_attention_gradients_equal_those_through_the_family_maths_written_out(family):
    """The gradient of a score with respect to each layer's attention, as the adapter hands it
    out, equals torch.autograd's gradient with respect to the attention of a forward in which each
    attention module is replaced by the family's maths written out here (float64)."""
    extra = FAMILIES[family].extra
    model = load(family).model.double()
    x = images().double()

    def score(features):
        return features.square().mean(dim=-1).sum()

    adapter = TimmAdapter(model)
    handed = {}
    with adapter.attention_gradients(lambda i, a, g: handed.__setitem__(i, (a.clone(), g.clone()))) as layers, torch.enable_grad():
        layers.begin()
        features = adapter.forward_features(x)
        layers.check_complete()
        torch.autograd.grad(score(features), layers.first())

    written_out = []

    def by_hand(attn):
        def forward(tokens, *_args, **_kwargs):
            probabilities, v = family_attention(model, attn, tokens, extra, with_values=True)
            written_out.append(probabilities)
            assert getattr(attn, "gate", None) is None
            out = (probabilities @ v).transpose(1, 2).reshape(tokens.shape)
            return attn.proj(getattr(attn, "norm", torch.nn.Identity())(out))

        return forward

    modules = [model.get_submodule(name) for name in adapter.layer_names]
    for module in modules:
        module.forward = by_hand(module)
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(score(model.forward_features(x)), written_out)
    finally:
        for module in modules:
            del module.forward
    assert sorted(handed) == list(range(len(written_out))) == [0, 1]
    for index, (attn, grad) in handed.items():
        torch.testing.assert_close(attn, written_out[index].detach(), atol=1e-10, rtol=1e-8)
        scale = grads[index].abs().max()
        assert scale > 0
        torch.testing.assert_close(grad, grads[index], atol=1e-9 * scale, rtol=1e-7)
