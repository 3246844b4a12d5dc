"""Shared fixtures: tiny randomly initialised timm ViTs (no download)."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

REPO = Path(__file__).resolve().parents[1]


def source_env() -> dict:
    """The environment for a ``python -m reportgen.cli`` subprocess: this checkout first on the path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


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


TINY_MODEL = {
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "input_size": 32,
    "options": {"patch_size": 8, "depth": 2, "embed_dim": 24, "num_heads": 3},
}


def write_photo(path, size=(48, 40), seed=0):
    """A small random RGB image saved at ``path`` (format from the suffix)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path)
    return path


def write_manifest(folder, images, model=None, **sections):
    """Write a manifest.yaml for the tiny random model (or ``model``) into ``folder``."""
    import yaml

    data = {"model": model or TINY_MODEL, "detector": {"name": "none"}, **sections, "images": images}
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def hand_attention(model, x):
    """Walk the blocks by hand and compute each layer's attention from its qkv weights."""
    expected = []
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for block in model.blocks:
            attn = block.attn
            y = block.norm1(h)
            B, N, C = y.shape
            heads, d = attn.num_heads, C // attn.num_heads
            w, b = attn.qkv.weight, attn.qkv.bias
            q = (y @ w[:C].T + b[:C]).reshape(B, N, heads, d).transpose(1, 2)
            k = (y @ w[C : 2 * C].T + b[C : 2 * C]).reshape(B, N, heads, d).transpose(1, 2)
            scores = q @ k.transpose(-2, -1) / math.sqrt(d)
            expected.append(torch.exp(scores - scores.amax(-1, keepdim=True)))
            expected[-1] = expected[-1] / expected[-1].sum(-1, keepdim=True)
            h = block(h)
        features = model.norm(h)
    return expected, features


def hand_rollout(attentions):
    """CLS row of the rollout (heads fused by mean, no discarding) over the patches, from the paper's
    formula written out with numpy: per layer 0.5*A + 0.5*I, rows renormalised, multiplied in turn."""
    n = attentions[0].shape[-1]
    joint = np.eye(n)
    for a in attentions:
        step = 0.5 * a[0].double().numpy().mean(axis=0) + 0.5 * np.eye(n)
        step /= step.sum(axis=1, keepdims=True)
        joint = step @ joint
    return joint[0, 1:]


def coverage_by_hand(box, grid, patch):
    """Area of each patch inside the box, divided by the patch area, by explicit loops."""
    rows, cols = grid
    cover = np.zeros(rows * cols)
    for r in range(rows):
        for c in range(cols):
            w = max(0.0, min(box[2], (c + 1) * patch) - max(box[0], c * patch))
            h = max(0.0, min(box[3], (r + 1) * patch) - max(box[1], r * patch))
            cover[r * cols + c] = w * h / patch**2
    return cover


def cosine(a, b):
    return float(a @ b / math.sqrt((a @ a) * (b @ b)))


def map_tile(site: Path, figures: dict, key: str) -> np.ndarray:
    """``[h, w, 3]`` the tile of figure ``key`` in an image's map sprite (``figures.overlays``),
    without its gutter, read from the written site."""
    from PIL import Image

    layout = figures["overlays"]
    w, h, g = layout["tile_width"], layout["tile_height"], layout["gutter"]
    sheet = np.asarray(Image.open(site / layout["sprite"]).convert("RGB"))
    assert sheet.shape == (h + 2 * g, len(layout["tiles"]) * (w + 2 * g), 3)
    left = layout["tiles"][key] * (w + 2 * g) + g
    return sheet[g : g + h, left : left + w]
