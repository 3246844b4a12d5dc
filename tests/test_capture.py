"""Captured attention equals an independent softmax(QK^T / sqrt(d)) from each block's weights."""

import pytest
import timm.layers
import torch
from conftest import hand_attention, make_tiny_vit

from reportgen.errors import CaptureError
from reportgen.model.capture import AttentionCapture


@pytest.mark.parametrize("prefix", [{}, {"reg_tokens": 2}])
def test_capture_equals_hand_softmax_with_fused_attention(prefix):
    fused_before = timm.layers.use_fused_attn()
    model = make_tiny_vit(img_size=(32, 48), **prefix)
    assert all(block.attn.fused_attn for block in model.blocks), "test must exercise the fused path"
    x = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    captured = {}
    with AttentionCapture(model, lambda i, a: captured.__setitem__(i, a.clone())) as capture:
        capture.begin()
        with torch.inference_mode():
            out = model.forward_features(x)
        capture.check_complete()
    expected, features = hand_attention(model, x)
    n_tokens = model.num_prefix_tokens + 4 * 6
    assert sorted(captured) == [0, 1]
    for i, attn in captured.items():
        assert attn.shape == (3, 3, n_tokens, n_tokens)
        torch.testing.assert_close(attn, expected[i].float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, features, atol=1e-5, rtol=1e-5)
    assert capture.info.layers == ("blocks.0.attn", "blocks.1.attn")
    assert capture.info.fused_attention == 2
    # Nothing left behind: hooks removed, timm's global switch untouched.
    assert timm.layers.use_fused_attn() == fused_before
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_hooks_removed_when_callback_raises(tiny_vit):
    def boom(i, a):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        with AttentionCapture(tiny_vit, boom):
            tiny_vit.forward_features(torch.zeros(1, 3, 32, 48))
    for module in tiny_vit.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_missing_layer_is_an_error(tiny_vit):
    with AttentionCapture(tiny_vit, lambda i, a: None) as capture:
        capture.begin()
        with torch.inference_mode():
            h = tiny_vit._pos_embed(tiny_vit.patch_embed(torch.zeros(1, 3, 32, 48)))
            tiny_vit.blocks[0](h)  # only the first layer runs
        with pytest.raises(CaptureError, match="1 of 2 layers.*blocks.1.attn"):
            capture.check_complete()


def test_model_without_timm_attention_is_refused():
    with pytest.raises(CaptureError, match="no timm Attention"):
        AttentionCapture(torch.nn.Linear(2, 2), lambda i, a: None)
