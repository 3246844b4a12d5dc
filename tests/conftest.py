"""Shared fixtures: tiny randomly initialised timm ViTs (no download)."""

import pytest
import timm
import torch


def make_tiny_vit(img_size=(32, 48), patch_size=8, depth=2, embed_dim=24, num_heads=3, seed=0, **kwargs):
    """A tiny random ViT built with timm's defaults (fused attention as timm decides)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=img_size,
            patch_size=patch_size,
            depth=depth,
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_classes=0,
            **kwargs,
        )
    return model.eval()


@pytest.fixture
def tiny_vit():
    return make_tiny_vit()
